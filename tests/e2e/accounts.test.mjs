// End-to-end tests of the dashboard's account pages and of chat delivery states, in a real
// browser against the real binary (see dashboard.test.mjs and harness.mjs):
//
// - the Users page (admins): add a user (the password rule), disable (that user's own
//   browser is sent to the login screen, with the reason), a disabled login, enable, the
//   last-admin refusal, change a role, reset a password, remove with a confirmation step;
//   no Users page for members;
// - change my password: the page goes on with the fresh token; an old token in another
//   browser context is signed out with the reason;
// - delivery: a message to an offline agent is queued, delivered when the agent connects; a
//   human's message beyond its newest 1000 waiting is retired when the agent connects: the
//   live ERROR `undelivered` turns it "not delivered".
//
// Run: scripts/e2e.sh.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, mkdirSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import {
  BIN, PYTHON, CHROMIUM, SHOTS, startServer, stop, startAgent, apiCall, launchBrowser, watchedPage, uiLogin,
} from './harness.mjs';

const step = (name) => console.log(`step: ${name}`);

/** A server on a fresh database and a browser; run(world) does the rest. */
async function withWorld(run) {
  assert.ok(existsSync(BIN), `server binary not found at ${BIN} (cargo build, or set ECHOCENTER_BIN)`);
  assert.ok(existsSync(PYTHON), `python not found at ${PYTHON} (set ECHOCENTER_TEST_PYTHON)`);
  assert.ok(existsSync(CHROMIUM), `chromium not found at ${CHROMIUM} (apt-get install chromium)`);
  mkdirSync(SHOTS, { recursive: true });
  const dir = mkdtempSync(path.join(tmpdir(), 'echocenter-e2e-'));
  const procs = [];
  const errors = [];
  let server = null;
  let browser = null;
  try {
    server = await startServer('127.0.0.1:0', path.join(dir, 'e2e.db'));
    const base = `http://${server.addr}`;
    browser = await launchBrowser();
    const api = (method, p, body, jwt) => apiCall(base, method, p, body, jwt);
    const open = async (name, viewport) => {
      const context = await browser.newContext({ viewport: viewport || { width: 1366, height: 900 } });
      const page = await watchedPage(context, errors, name);
      await page.goto(base + '/');
      return page;
    };
    await run({ base, api, open, procs, errors, tab: async (page, name) => {
      const other = await watchedPage(page.context(), errors, name);
      await other.goto(base + '/');
      return other;
    } });
    assert.deepEqual(errors, [], 'no JavaScript errors and nothing blocked on the pages');
  } catch (err) {
    const dumps = [server?.out?.dump?.(), ...procs.map((p) => p.out.dump())].filter(Boolean).join('\n');
    err.message += '\n' + dumps;
    throw err;
  } finally {
    if (browser) await browser.close().catch(() => {});
    for (const p of procs) await stop(p.child);
    if (server) await stop(server.child);
    rmSync(dir, { recursive: true, force: true });
  }
}

test('users page, change my password, sessions that end', { timeout: 240_000 }, () => withWorld(async ({ api, open, tab }) => {
  step('an admin signs in: the header offers the Users page');
  const admin = await open('admin');
  await uiLogin(admin, 'admin', 'admin123');
  await admin.locator('#conn[data-state="live"]').waitFor();
  await admin.getByRole('button', { name: 'Users', exact: true }).click();
  await admin.locator('#users-view').waitFor({ state: 'visible' });
  await admin.locator('#app-view').waitFor({ state: 'hidden' });
  const row = (name) => admin.locator(`#user-list li[data-username="${name}"]`);
  const msg = (name) => row(name).locator('.user-msg');
  await row('admin').locator('.badge.you', { hasText: 'you' }).waitFor();
  assert.equal(await admin.locator('#user-list li[data-username="Butler"]').count(), 0, 'machines are not listed');
  // Nobody disables or removes themselves.
  assert.equal(await row('admin').getByRole('button', { name: 'Disable admin' }).count(), 0);
  assert.equal(await row('admin').getByRole('button', { name: 'Remove admin' }).count(), 0);
  await admin.locator('#users-count', { hasText: '1 user · 1 admin' }).waitFor();

  step('add a member: the password rule is shown and checked');
  const add = admin.locator('#user-add-form');
  await add.locator('#new-user-password-hint', { hasText: 'At least 8 characters' }).waitFor();
  await add.getByLabel('Username').fill('alice');
  await add.getByLabel('Password').fill('short');
  await add.getByRole('button', { name: 'Add user' }).click();
  await admin.locator('#user-add-error', { hasText: 'at least 8 characters' }).waitFor();
  await add.getByLabel('Password').fill('alice-pass-1');
  await add.getByRole('button', { name: 'Add user' }).click();
  await msg('alice').filter({ hasText: 'Added alice as a member' }).waitFor();
  assert.equal(await row('alice').getByLabel('Role of alice').inputValue(), 'MEMBER');
  assert.equal(await row('alice').getAttribute('data-disabled'), 'false');
  // A name that is taken: the server's refusal, inline.
  await add.getByLabel('Username').fill('alice');
  await add.getByLabel('Password').fill('another-pass');
  await add.getByRole('button', { name: 'Add user' }).click();
  await admin.locator('#user-add-error', { hasText: 'Username already exists' }).waitFor();
  await add.getByLabel('Username').fill('');
  await add.getByLabel('Password').fill('');

  step('alice signs in in her own browser: a member has no Users page');
  const alice = await open('alice', { width: 1280, height: 800 });
  await uiLogin(alice, 'alice', 'alice-pass-1');
  await alice.locator('#whoami', { hasText: 'alice (MEMBER)' }).waitFor();
  await alice.locator('#conn[data-state="live"]').waitFor();
  assert.equal(await alice.locator('#nav').isVisible(), false);
  await alice.evaluate(() => { location.hash = '#users'; });
  await alice.waitForFunction(() => location.hash === '#users');
  assert.equal(await alice.locator('#users-view').isVisible(), false, 'a member gets the dashboard');
  assert.equal(await alice.locator('#app-view').isVisible(), true);

  step('disable alice: her page goes to the login screen and says why');
  await row('alice').getByRole('button', { name: 'Disable alice' }).click();
  await msg('alice').filter({ hasText: 'Disabled: alice was signed out everywhere' }).waitFor();
  await row('alice').locator('.badge.disabled').waitFor();
  assert.equal(await row('alice').getAttribute('data-disabled'), 'true');
  await alice.locator('#login-view').waitFor({ state: 'visible' });
  await alice.locator('#login-notice', { hasText: 'Your session ended: your account was disabled by an admin.' }).waitFor();
  assert.equal(await alice.locator('#app-view').isVisible(), false);
  // The page does not keep trying to reconnect.
  assert.equal(await alice.locator('#offline-banner').isVisible(), false);

  step('a disabled account cannot sign in, and is told so');
  await uiLogin(alice, 'alice', 'alice-pass-1');
  await alice.locator('#login-error', { hasText: 'Account disabled' }).waitFor();
  assert.equal(await alice.locator('#login-notice').isVisible(), true, 'why the session ended stays above the form');
  await alice.locator('#login-view form').screenshot({ path: path.join(SHOTS, 'dashboard-login-disabled.png') });

  step('enable alice: she signs in again');
  await row('alice').getByRole('button', { name: 'Enable alice' }).click();
  await msg('alice').filter({ hasText: 'Enabled: alice can sign in again.' }).waitFor();
  assert.equal(await row('alice').getAttribute('data-disabled'), 'false');
  await uiLogin(alice, 'alice', 'alice-pass-1');
  await alice.locator('#conn[data-state="live"]').waitFor();
  assert.equal(await alice.locator('#login-notice').isVisible(), false);

  step('the last admin cannot step down: the refusal shows on the row');
  await row('admin').getByLabel('Role of admin').selectOption('MEMBER'); // confirm() is accepted
  await msg('admin').filter({ hasText: 'cannot remove the last admin' }).waitFor();
  assert.equal(await msg('admin').getAttribute('data-kind'), 'error');
  assert.equal(await row('admin').getByLabel('Role of admin').inputValue(), 'ADMIN', 'the select shows the role kept');
  assert.equal(await admin.locator('#conn').getAttribute('data-state'), 'live');

  step('make alice an admin: her session ends; signed in again she has the Users page');
  await row('alice').getByLabel('Role of alice').selectOption('ADMIN');
  await msg('alice').filter({ hasText: 'alice is now an admin' }).waitFor();
  assert.equal(await row('alice').getAttribute('data-role'), 'ADMIN');
  await alice.locator('#login-notice', { hasText: 'the password or the role of this account was changed' }).waitFor();
  await uiLogin(alice, 'alice', 'alice-pass-1');
  await alice.locator('#whoami', { hasText: 'alice (ADMIN)' }).waitFor();
  await alice.getByRole('button', { name: 'Users', exact: true }).waitFor();
  await admin.locator('#users-count', { hasText: '2 users · 2 admins' }).waitFor();
  await row('alice').getByLabel('Role of alice').selectOption('MEMBER');
  await msg('alice').filter({ hasText: 'alice is now a member' }).waitFor();
  await alice.locator('#login-notice', { hasText: 'role' }).waitFor();
  await uiLogin(alice, 'alice', 'alice-pass-1');
  await alice.locator('#whoami', { hasText: 'alice (MEMBER)' }).waitFor();
  await alice.locator('#conn[data-state="live"]').waitFor();

  step("reset alice's password: she is signed out; the old password stops working");
  await row('alice').getByRole('button', { name: 'Reset the password of alice' }).click();
  const newPw = row('alice').getByLabel('New password for alice');
  await newPw.fill('1234567');
  await row('alice').getByRole('button', { name: 'Set password' }).click();
  await msg('alice').filter({ hasText: 'at least 8 characters' }).waitFor();
  await newPw.fill('alice-pass-2');
  await row('alice').getByRole('button', { name: 'Set password' }).click();
  await msg('alice').filter({ hasText: 'New password set: alice was signed out everywhere' }).waitFor();
  await row('alice').locator('.user-reset').waitFor({ state: 'hidden' });
  await alice.locator('#login-notice', { hasText: 'Your session ended' }).waitFor();
  await uiLogin(alice, 'alice', 'alice-pass-1');
  await alice.locator('#login-error', { hasText: 'invalid credentials' }).waitFor();
  await uiLogin(alice, 'alice', 'alice-pass-2');
  await alice.locator('#conn[data-state="live"]').waitFor();

  step('change my password: another context still holds the old token');
  const admin2 = await open('admin-elsewhere');
  await uiLogin(admin2, 'admin', 'admin123');
  await admin2.locator('#conn[data-state="live"]').waitFor();
  // A second tab of the same browser shares the stored session.
  const sameBrowser = await tab(admin, 'admin-tab2');
  await sameBrowser.locator('#conn[data-state="live"]').waitFor();
  const oldToken = await admin.evaluate(() => localStorage.getItem('token'));
  await admin.locator('#user-menu-btn').click();
  await admin.getByRole('menuitem', { name: 'Change password…' }).click();
  const dlg = admin.locator('#pw-dialog');
  await dlg.waitFor({ state: 'visible' });
  await dlg.locator('#pw-hint', { hasText: 'At least 8 characters' }).waitFor();
  await dlg.getByLabel('Current password').fill('wrong-password');
  await dlg.getByLabel('New password', { exact: true }).fill('admin-pass-2');
  await dlg.getByLabel('Confirm the new password').fill('admin-pass-2');
  await dlg.getByRole('button', { name: 'Change password' }).click();
  await dlg.locator('#pw-error', { hasText: 'The current password is not right.' }).waitFor();
  // A wrong current password is not the end of the session.
  assert.equal(await admin.locator('#users-view').isVisible(), true);
  assert.equal(await admin.evaluate(() => localStorage.getItem('token')), oldToken);
  await dlg.getByLabel('Current password').fill('admin123');
  await dlg.getByLabel('Confirm the new password').fill('admin-pass-3');
  await dlg.getByRole('button', { name: 'Change password' }).click();
  await dlg.locator('#pw-error', { hasText: 'The two new passwords differ.' }).waitFor();
  await dlg.getByLabel('Confirm the new password').fill('admin-pass-2');
  await dlg.getByRole('button', { name: 'Change password' }).click();
  await dlg.waitFor({ state: 'hidden' });
  await admin.locator('#toast[data-kind="ok"]', { hasText: 'Password changed.' }).waitFor();

  step('the page goes on with the new token: socket live again, REST works, a reload keeps it');
  await admin.locator('#conn[data-state="live"]').waitFor();
  await admin.locator('#offline-banner').waitFor({ state: 'hidden' });
  const newToken = await admin.evaluate(() => localStorage.getItem('token'));
  assert.notEqual(newToken, oldToken);
  await assert.rejects(api('GET', '/api/users/me', undefined, oldToken), /401/);
  assert.equal((await api('GET', '/api/users/me', undefined, newToken)).username, 'admin');
  await add.getByLabel('Username').fill('bob');
  await add.getByLabel('Password').fill('bob-pass-123');
  await add.getByRole('button', { name: 'Add user' }).click();
  await msg('bob').filter({ hasText: 'Added bob' }).waitFor();
  assert.equal(await admin.locator('#login-view').isVisible(), false);

  step('the old token in the other context is signed out with the reason');
  await admin2.locator('#login-view').waitFor({ state: 'visible' });
  await admin2.locator('#login-notice', { hasText: 'the password or the role of this account was changed' }).waitFor();
  await uiLogin(admin2, 'admin', 'admin123');
  await admin2.locator('#login-error', { hasText: 'invalid credentials' }).waitFor();
  await uiLogin(admin2, 'admin', 'admin-pass-2');
  await admin2.locator('#conn[data-state="live"]').waitFor();
  // The other tab of the same browser took the new token over instead of signing out.
  await sameBrowser.locator('#conn[data-state="live"]').waitFor();
  assert.equal(await sameBrowser.locator('#login-view').isVisible(), false);
  assert.equal(await sameBrowser.evaluate(() => localStorage.getItem('token')), newToken);
  await sameBrowser.getByRole('button', { name: 'Refresh', exact: true }).first().click();
  await sameBrowser.locator('#agent-list li[data-username="Butler"]').waitFor();
  await sameBrowser.close();
  await admin.reload();
  await admin.locator('#users-view').waitFor({ state: 'visible' });
  await admin.locator('#conn[data-state="live"]').waitFor();
  await row('bob').waitFor();

  step('remove alice: the first click only arms the button; her session ends');
  await row('alice').getByRole('button', { name: 'Remove alice' }).click();
  const confirmRemove = row('alice').getByRole('button', { name: 'Confirm: remove alice' });
  await confirmRemove.waitFor();
  await msg('alice').filter({ hasText: 'Click “Confirm remove” to remove alice' }).waitFor();
  const jwt = (await api('POST', '/api/auth/login', { username: 'admin', password: 'admin-pass-2' })).token;
  assert.ok((await api('GET', '/api/users', undefined, jwt)).some((u) => u.username === 'alice'), 'not removed yet');
  await confirmRemove.click();
  await row('alice').waitFor({ state: 'detached' });
  assert.ok(!(await api('GET', '/api/users', undefined, jwt)).some((u) => u.username === 'alice'));
  await alice.locator('#login-notice', { hasText: 'Your session ended: your account was removed.' }).waitFor();

  step('screenshots of the users page');
  await api('POST', '/api/users', { username: 'carol', password: 'carol-pass-1', role: 'ADMIN' }, jwt);
  const dave = await api('POST', '/api/users', { username: 'dave.ops', password: 'dave-pass-12', role: 'MEMBER' }, jwt);
  await api('PATCH', `/api/users/${dave.id}`, { disabled: true }, jwt);
  await admin.getByRole('button', { name: 'Refresh' }).click();
  await row('dave.ops').locator('.badge.disabled').waitFor();
  assert.equal(await row('carol').getAttribute('data-role'), 'ADMIN');
  await admin.locator('#users-count', { hasText: '4 users · 2 admins · 1 disabled' }).waitFor();
  await row('bob').getByRole('button', { name: 'Reset the password of bob' }).click();
  await admin.locator('#toast-close').click();
  await admin.setViewportSize({ width: 1440, height: 900 });
  await admin.evaluate(() => document.activeElement && document.activeElement.blur());
  await admin.screenshot({ path: path.join(SHOTS, 'dashboard-users.png') });
  await admin.setViewportSize({ width: 390, height: 844 });
  await admin.waitForFunction(() => document.documentElement.scrollWidth <= window.innerWidth);
  await admin.screenshot({ path: path.join(SHOTS, 'dashboard-users-mobile.png'), fullPage: true });
  // The dialog on a phone.
  await admin.locator('#user-menu-btn').click();
  await admin.getByRole('menuitem', { name: 'Change password…' }).click();
  await dlg.waitFor({ state: 'visible' });
  await admin.waitForFunction(() => document.documentElement.scrollWidth <= window.innerWidth);
  const box = await dlg.boundingBox();
  assert.ok(box.x >= 0 && box.x + box.width <= 390, `the dialog fits: ${JSON.stringify(box)}`);
  await admin.screenshot({ path: path.join(SHOTS, 'dashboard-password-mobile.png') });
  await dlg.getByRole('button', { name: 'Cancel' }).click();
  await dlg.waitFor({ state: 'hidden' });
  await admin.getByRole('button', { name: 'Dashboard' }).click();
  await admin.locator('#app-view').waitFor({ state: 'visible' });
  await admin.waitForFunction(() => document.documentElement.scrollWidth <= window.innerWidth);
}));

test('chat delivery: queued, delivered when the agent connects, not delivered after a flood', { timeout: 240_000 }, () => withWorld(async ({ base, api, open, procs }) => {
  const { token: jwt } = await api('POST', '/api/auth/login', { username: 'admin', password: 'admin123' });
  const later = await api('POST', '/api/users/agents', { username: 'e2e-later' }, jwt);
  const flooded = await api('POST', '/api/users/agents', { username: 'e2e-flooded' }, jwt);
  const page = await open('admin');
  await uiLogin(page, 'admin', 'admin123');
  await page.locator('#conn[data-state="live"]').waitFor();
  const mine = (text) => page.locator('#chat-log .msg[data-sender="me"]', { hasText: text });
  /** The history row with that text (paging back through the whole conversation). */
  const historyRow = async (peerId, text) => {
    let before = '';
    for (;;) {
      const rows = await api('GET', `/api/chat/history/${peerId}?limit=500${before}`, undefined, jwt);
      const found = rows.find((r) => r.payload === text);
      if (found || !rows.length) return found;
      before = `&before_id=${rows[0].id}`;
    }
  };

  step('a message to an offline agent is queued until it connects');
  await page.getByLabel('Chat with', { exact: true }).selectOption({ label: 'e2e-later — offline' });
  await page.getByLabel('Message', { exact: true }).fill('wait for me');
  await page.getByLabel('Message', { exact: true }).press('Enter');
  await mine('wait for me').and(page.locator('[data-status="queued"][data-msg-id]')).waitFor();
  assert.equal(await mine('wait for me').locator('.state').textContent(), 'queued, will be delivered when e2e-later connects');
  assert.equal((await historyRow(later.id, 'wait for me')).delivery, 'pending');
  // After a reload the history says the same.
  await page.reload();
  await page.locator('#conn[data-state="live"]').waitFor();
  await mine('wait for me').and(page.locator('[data-status="queued"]')).waitFor();

  step('the agent connects: the message turns delivered');
  procs.push(startAgent(base, later.api_token, 'e2e-later', ['--silent']));
  await page.locator('#agent-list li[data-username="e2e-later"][data-online="true"]').waitFor();
  await mine('wait for me').and(page.locator('[data-msg-id]:not([data-status])')).waitFor();
  assert.equal(await mine('wait for me').locator('.state').textContent(), '');
  assert.equal((await historyRow(later.id, 'wait for me')).delivery, 'delivered');

  step('a message to another offline agent is queued; then 1000 newer ones from the same human');
  await page.getByLabel('Chat with', { exact: true }).selectOption({ label: 'e2e-flooded — offline' });
  await page.getByLabel('Message', { exact: true }).fill('the oldest of many');
  await page.getByLabel('Message', { exact: true }).press('Enter');
  const oldest = mine('the oldest of many');
  await oldest.and(page.locator('[data-status="queued"][data-msg-id]')).waitFor();
  // Store and forward keeps a human's newest 1000 waiting frames: 1000 more retire this one
  // when the agent connects. (The development endpoint stores frames as if they were sent.)
  let next = 0;
  const worker = async () => {
    while (next < 1000) {
      const i = next++;
      await api('POST', '/api/dev/mock/chat', { sender_username: 'admin', receiver_username: 'e2e-flooded', content: `flood ${i}` }, jwt);
    }
  };
  await Promise.all(Array.from({ length: 6 }, worker));

  step('the agent connects: the live ERROR undelivered turns the oldest "not delivered"');
  procs.push(startAgent(base, flooded.api_token, 'e2e-flooded', ['--silent']));
  await oldest.and(page.locator('[data-status="retired"]')).waitFor();
  const state = oldest.locator('.state');
  assert.equal(await state.textContent(), 'not delivered');
  assert.match(await state.getAttribute('title'), /store and forward gave up on it.*e2e-flooded stayed offline too long/);
  // In the warning colour (the one the offline chat status uses).
  const colour = await state.evaluate((el) => getComputedStyle(el).color);
  const warn = await page.evaluate(() => {
    const probe = document.createElement('p');
    probe.className = 'chat-status';
    probe.setAttribute('data-online', 'false');
    document.body.append(probe);
    const c = getComputedStyle(probe).color;
    probe.remove();
    return c;
  });
  assert.equal(colour, warn);
  await page.locator('#toast[data-kind="warn"]', { hasText: '1 message to e2e-flooded was not delivered' }).waitFor();
  assert.equal((await historyRow(flooded.id, 'the oldest of many')).delivery, 'retired');
  // The agent got the newest 1000.
  await page.locator('#log .log-row', { hasText: 'e2e-flooded received 1000 chats' }).waitFor({ timeout: 60_000 });
  await page.screenshot({ path: path.join(SHOTS, 'dashboard-undelivered.png') });

  step('"Send again" sends it anew, and this time it is delivered');
  await oldest.getByRole('button', { name: 'Send again' }).click();
  await page.waitForFunction(() => [...document.querySelectorAll('#chat-log .msg[data-sender="me"]')]
    .filter((m) => m.textContent.includes('the oldest of many')).length === 2);
  await mine('the oldest of many').and(page.locator('[data-msg-id]:not([data-status])')).waitFor();
  assert.equal(await mine('the oldest of many').and(page.locator('[data-status="retired"]')).count(), 1, 'the first stays not delivered');
}));
