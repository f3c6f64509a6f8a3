//! A fixed set of database connections lent out one caller at a time, shared by the backends.
//! A caller waits when all are out; a connection goes back when its lease is dropped.

use std::sync::{Condvar, Mutex};

pub struct Pool<C> {
    free: Mutex<Vec<C>>,
    returned: Condvar,
}

/// A connection borrowed from a pool.
pub struct Lease<'a, C> {
    pool: &'a Pool<C>,
    conn: Option<C>,
}

impl<C> Pool<C> {
    pub fn new(conns: Vec<C>) -> Pool<C> {
        Pool {
            free: Mutex::new(conns),
            returned: Condvar::new(),
        }
    }

    pub fn get(&self) -> Lease<'_, C> {
        // A panic while holding the lock leaves the list itself intact.
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(conn) = free.pop() {
                return Lease {
                    pool: self,
                    conn: Some(conn),
                };
            }
            free = self.returned.wait(free).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl<C> std::ops::Deref for Lease<'_, C> {
    type Target = C;
    fn deref(&self) -> &C {
        // Present from `get` until `drop`.
        self.conn.as_ref().expect("a lease holds its connection")
    }
}

impl<C> std::ops::DerefMut for Lease<'_, C> {
    fn deref_mut(&mut self) -> &mut C {
        self.conn.as_mut().expect("a lease holds its connection")
    }
}

impl<C> Drop for Lease<'_, C> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let mut free = self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
            free.push(conn);
            self.pool.returned.notify_one();
        }
    }
}
