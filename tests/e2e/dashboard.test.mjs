// End-to-end test of the embedded dashboard in a real browser.
//
// Starts the real `echocenter` binary (ECHOCENTER_BIN, default target/debug/echocenter) on a
// free port with a temporary database, drives Debian's Chromium through playwright-core, and
// runs a small Python agent (tests/e2e/stream_agent.py, interpreter from ECHOCENTER_TEST_PYTHON)
// that answers CHATs with streamed replies. Every wait is a wait for a condition with a
// deadline; there are no fixed sleeps.
//
// Run: scripts/e2e.sh (installs what is missing, builds, runs this file).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '..', '..');
const BIN = path.resolve(root, process.env.ECHOCENTER_BIN || 'target/debug/echocenter');
const PYTHON = process.env.ECHOCENTER_TEST_PYTHON || path.join(root, 'target/venv/bin/python');
const AGENT = path.join(here, 'stream_agent.py');
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const SHOTS = path.join(root, 'target', 'e2e');
const WAIT = 20_000;

/** Output of a child process, kept for the failure message. */
function capture(child, name) {
  const out = { text: '' };
  const add = (chunk) => {
    out.text += chunk.toString();
    if (out.text.length > 200_000) out.text = out.text.slice(-100_000);
  };
  child.stdout?.on('data', add);
  child.stderr?.on('data', add);
  out.dump = () => `--- ${name} output ---\n${out.text}\n--- end ${name} ---`;
  return out;
}

/** Starts the server; resolves once it prints `listening on ADDR`. */
function startServer(addr, db) {
  const child = spawn(BIN, ['--addr', addr, '--db', db], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ECHOCENTER_LOG: 'info' },
  });
  const out = capture(child, 'echocenter');
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('server did not start\n' + out.dump())), WAIT);
    let buf = '';
    child.stdout.on('data', (chunk) => {
      buf += chunk.toString();
      const m = buf.match(/listening on (\S+)/);
      if (m) { clearTimeout(timer); resolve({ child, out, addr: m[1] }); }
    });
    child.on('exit', (code) => { clearTimeout(timer); reject(new Error(`server exited with ${code}\n${out.dump()}`)); });
  });
}

function stop(child) {
  return new Promise((resolve) => {
    if (!child || child.exitCode !== null || child.signalCode !== null) { resolve(); return; }
    child.removeAllListeners('exit');
    child.once('exit', () => resolve());
    child.kill('SIGTERM');
  });
}

function startAgent(base, token, name, extra = []) {
  const child = spawn(PYTHON, [AGENT, '--url', base.replace(/^http/, 'ws'), '--token', token, '--name', name, ...extra], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  return { child, out: capture(child, name) };
}

async function api(base, method, p, body, jwt) {
  const headers = {};
  if (jwt) headers.Authorization = 'Bearer ' + jwt;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(base + p, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) throw new Error(`${method} ${p} -> ${res.status} ${text}`);
  return data;
}

test('dashboard: login, agents, live log, streamed chat, approvals, reload, reconnect', { timeout: 240_000 }, async () => {
  assert.ok(existsSync(BIN), `server binary not found at ${BIN} (cargo build, or set ECHOCENTER_BIN)`);
  assert.ok(existsSync(PYTHON), `python not found at ${PYTHON} (set ECHOCENTER_TEST_PYTHON)`);
  assert.ok(existsSync(CHROMIUM), `chromium not found at ${CHROMIUM} (apt-get install chromium)`);
  mkdirSync(SHOTS, { recursive: true });

  const dir = mkdtempSync(path.join(tmpdir(), 'echocenter-e2e-'));
  const db = path.join(dir, 'e2e.db');
  const procs = [];
  let server = null;
  let browser = null;
  const pageErrors = [];
  const step = (name) => console.log(`step: ${name}`);

  try {
    server = await startServer('127.0.0.1:0', db);
    const base = `http://${server.addr}`;

    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
    const page = await context.newPage();
    page.setDefaultTimeout(WAIT);
    page.on('pageerror', (err) => pageErrors.push(String(err)));
    // The page runs under a strict Content-Security-Policy: anything it blocks is a bug.
    page.on('console', (msg) => {
      if (/Content.Security.Policy/i.test(msg.text())) pageErrors.push(msg.text());
    });
    page.on('dialog', (d) => d.accept());

    step('log in through the UI');
    await page.goto(base + '/');
    const login = page.locator('#login-view');
    await login.getByLabel('Username').fill('admin');
    await login.getByLabel('Password').fill('wrong-password');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.locator('#login-error', { hasText: 'invalid credentials' }).waitFor();
    await login.getByLabel('Password').fill('admin123');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.locator('#app-view').waitFor({ state: 'visible' });
    await page.locator('#whoami', { hasText: 'admin (ADMIN)' }).waitFor();
    await page.locator('#conn[data-state="live"]').waitFor();
    // The Butler is always listed.
    await page.locator('#agent-list li[data-username="Butler"]').waitFor();

    step('register an agent through the API');
    const { token: jwt, user: admin } = await api(base, 'POST', '/api/auth/login', { username: 'admin', password: 'admin123' });
    const streamer = await api(base, 'POST', '/api/users/agents',
      { username: 'e2e-streamer', agent_kind: 'python-test', description: 'answers with streamed replies' }, jwt);
    assert.match(streamer.api_token, /^ec_[0-9a-f]{64}$/);

    step('register another agent through the UI; its token is shown once');
    await page.locator('#register summary').click();
    const register = page.locator('#register-form');
    await register.getByLabel('Username').fill('e2e-offline');
    await register.getByLabel('Agent kind (optional)').fill('sleeper');
    await register.getByRole('button', { name: 'Register', exact: true }).click();
    await page.locator('#token-reveal').waitFor({ state: 'visible' });
    const shown = await page.locator('#token-value').textContent();
    assert.match(shown, /^ec_[0-9a-f]{64}$/, 'the new token is shown');
    await page.getByRole('button', { name: 'Done' }).click();
    await page.locator('#token-reveal').waitFor({ state: 'hidden' });
    assert.equal(await page.locator('#token-value').textContent(), '', 'the token is gone after Done');
    const offlineCard = page.locator('#agent-list li[data-username="e2e-offline"]');
    await offlineCard.waitFor();
    assert.equal(await offlineCard.getAttribute('data-online'), 'false');
    assert.match(await offlineCard.textContent(), /kind: sleeper/);

    step('start the Python agent; it comes online and its SYSTEM_LOG appears live');
    const agent = startAgent(base, streamer.api_token, 'e2e-streamer');
    procs.push(agent);
    const card = page.locator('#agent-list li[data-username="e2e-streamer"][data-online="true"]');
    await card.waitFor();
    await card.locator('.presence', { hasText: 'online' }).waitFor();
    await page.locator('#log .log-row[data-level="SUCCESS"]', { hasText: 'e2e-streamer online' }).waitFor();
    await card.locator('.report', { hasText: 'e2e-streamer online' }).waitFor();

    step('chat: the streamed reply renders while it streams and merges with the final CHAT');
    await card.getByRole('button', { name: 'Chat with e2e-streamer' }).click();
    await page.locator('#chat-status[data-online="true"]').waitFor();
    await page.getByLabel('Message', { exact: true }).fill('hello from e2e');
    await page.getByRole('button', { name: 'Send', exact: true }).click();
    const final = 'Echo: hello from e2e (3 chunks)';
    // The user's message shows at once, then is reconciled with the server echo (id).
    await page.locator('#chat-log .msg[data-sender="me"]', { hasText: 'hello from e2e' }).waitFor();
    await page.locator('#chat-log .msg[data-sender="me"][data-msg-id]:not([data-status])', { hasText: 'hello from e2e' }).waitFor();
    // The reply while it streams: partial text, no id yet.
    // (Read in the same poll that finds it, so a fast stream cannot end in between.)
    const seen = await (await page.waitForFunction(() => {
      const m = document.querySelector('#chat-log .msg[data-sender="peer"][data-status="streaming"]');
      return m && { text: m.querySelector('.body').textContent, id: m.getAttribute('data-msg-id') };
    })).jsonValue();
    assert.ok(final.startsWith(seen.text) && seen.text.length < final.length, `partial text ${JSON.stringify(seen.text)}`);
    assert.equal(seen.id, null, 'no id while streaming');
    // Then the final CHAT lands in the same bubble.
    const replyDone = page.locator('#chat-log .msg[data-sender="peer"][data-msg-id]:not([data-status])');
    await replyDone.filter({ hasText: final }).waitFor();
    await page.waitForFunction(() => document.querySelectorAll('#chat-log .msg[data-sender="peer"]').length === 1);
    assert.equal(await page.locator('#chat-log .msg[data-sender="peer"] .body').textContent(), final);
    await page.locator('#log .log-row', { hasText: 'e2e-streamer handled chat #1' }).waitFor();

    step('an offline agent is marked and the outgoing message is queued');
    await page.getByLabel('Chat with', { exact: true }).selectOption({ label: 'e2e-offline — offline' });
    await page.locator('#chat-status[data-online="false"]', { hasText: 'offline' }).waitFor();
    await page.getByLabel('Message', { exact: true }).fill('are you there?');
    await page.getByLabel('Message', { exact: true }).press('Enter');
    const queued = page.locator('#chat-log .msg[data-sender="me"][data-status="queued"]', { hasText: 'are you there?' });
    await queued.waitFor();
    await queued.locator('.state', { hasText: 'queued' }).waitFor();
    await page.locator('#chat-log .msg[data-sender="me"][data-status="queued"][data-msg-id]').waitFor(); // stored

    step('Butler approvals: AUTH_REQUEST card, approve, the Butler hears it');
    const butlerRow = (await api(base, 'GET', '/api/users/agents', undefined, jwt)).find((u) => u.role === 'BUTLER');
    const rotated = await api(base, 'PATCH', `/api/users/agents/${butlerRow.id}/token`, {}, jwt);
    const butler = startAgent(base, rotated.api_token, 'Butler', ['--auth-request-to', String(admin.id)]);
    procs.push(butler);
    const approval = page.locator('#approval-list li.approval[data-status="PENDING"]', { hasText: 'systemctl restart storage' });
    await approval.waitFor();
    assert.match(await approval.textContent(), /Reason: disk usage above 90%/);
    await approval.getByRole('button', { name: 'Approve' }).click();
    // One click only arms the button: nothing is answered yet.
    await approval.getByRole('button', { name: 'Confirm approve' }).waitFor();
    assert.equal(await approval.getAttribute('data-status'), 'PENDING');
    await approval.getByRole('button', { name: 'Confirm approve' }).click();
    await page.locator('#approval-list li.approval[data-status="APPROVED"] .verdict', { hasText: 'Approved' }).waitFor();
    await page.locator('#log .log-row[data-level="AUTH"]', { hasText: 'auth response received: approved' }).waitFor();

    step('log filters and search');
    await page.getByLabel('Search the log').fill('handled chat');
    await page.waitForFunction(() => {
      const rows = [...document.querySelectorAll('#log .log-row')].filter((r) => !r.hidden);
      return rows.length >= 1 && rows.every((r) => r.textContent.includes('handled chat'));
    });
    await page.getByLabel('Search the log').fill('');
    await page.getByLabel('Level', { exact: true }).selectOption('AUTH');
    await page.waitForFunction(() => {
      const rows = [...document.querySelectorAll('#log .log-row')].filter((r) => !r.hidden);
      return rows.length >= 1 && rows.every((r) => r.dataset.level === 'AUTH');
    });
    await page.getByLabel('Level', { exact: true }).selectOption('');

    step('new log lines do not move the view while the user is scrolled away');
    for (let i = 0; i < 60; i++) {
      await api(base, 'POST', '/api/messages', { agent_id: 'e2e-bulk', level: 'DEBUG', content: `bulk line ${i}` }, jwt);
    }
    await page.locator('#log .log-row', { hasText: 'bulk line 59' }).waitFor();
    await page.waitForFunction(() => { const b = document.getElementById('log'); return b.scrollHeight > b.clientHeight * 1.5; });
    // At the bottom, it follows new lines.
    assert.ok(await page.evaluate(() => { const b = document.getElementById('log'); return b.scrollHeight - b.scrollTop - b.clientHeight < 24; }));
    const anchor = await page.evaluate(() => {
      const b = document.getElementById('log');
      b.scrollTop = Math.floor((b.scrollHeight - b.clientHeight) / 2);
      const top = b.getBoundingClientRect().top;
      const row = [...b.querySelectorAll('.log-row')].find((r) => !r.hidden && r.getBoundingClientRect().top >= top);
      return { id: row.dataset.logId, top: row.getBoundingClientRect().top, scrollTop: b.scrollTop };
    });
    for (let i = 60; i < 65; i++) {
      await api(base, 'POST', '/api/messages', { agent_id: 'e2e-bulk', level: 'DEBUG', content: `bulk line ${i}` }, jwt);
    }
    await page.locator('#log .log-row', { hasText: 'bulk line 64' }).waitFor({ state: 'attached' });
    await page.locator('#log-jump', { hasText: 'new' }).waitFor();
    const after = await page.evaluate((id) => {
      const b = document.getElementById('log');
      return { top: b.querySelector(`[data-log-id="${id}"]`).getBoundingClientRect().top, scrollTop: b.scrollTop };
    }, anchor.id);
    assert.ok(Math.abs(after.top - anchor.top) < 1, `row moved from ${anchor.top} to ${after.top}`);
    assert.equal(after.scrollTop, anchor.scrollTop);
    await page.locator('#log-jump').click();
    await page.locator('#log-jump').waitFor({ state: 'hidden' });
    await api(base, 'POST', '/api/messages', { agent_id: 'e2e-bulk', level: 'WARNING', content: 'bulk line 65' }, jwt);
    await page.locator('#log .log-row', { hasText: 'bulk line 65' }).waitFor();
    await page.waitForFunction(() => { const b = document.getElementById('log'); return b.scrollHeight - b.scrollTop - b.clientHeight < 24; });

    step('screenshot');
    await page.getByLabel('Chat with', { exact: true }).selectOption({ label: 'e2e-streamer — online' });
    await replyDone.filter({ hasText: final }).waitFor();
    await page.screenshot({ path: path.join(SHOTS, 'dashboard.png') });

    step('after a reload the final message comes from history');
    await page.reload();
    await page.locator('#conn[data-state="live"]').waitFor();
    // The open conversation is restored.
    await page.waitForFunction((id) => document.getElementById('chat-peer').value === id, String(streamer.id));
    await replyDone.filter({ hasText: final }).waitFor();
    await page.locator('#chat-log .msg[data-sender="me"][data-msg-id]', { hasText: 'hello from e2e' }).waitFor();
    assert.equal(await page.locator('#chat-log .msg[data-sender="peer"]').count(), 1, 'one reply bubble, not chunks');
    await page.locator('#log .log-row', { hasText: 'e2e-streamer online' }).waitFor();
    // The answered approval is not offered again.
    assert.equal(await page.locator('#approval-list li').count(), 0);

    step('readable on a phone: no horizontal scrolling');
    await page.setViewportSize({ width: 390, height: 844 });
    await page.waitForFunction(() => document.documentElement.scrollWidth <= window.innerWidth);
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-mobile.png') });
    await page.setViewportSize({ width: 1366, height: 900 });

    step('the socket reconnects with back-off and says so');
    const addr = server.addr;
    await stop(server.child);
    await page.locator('#conn[data-state="down"]', { hasText: 'Reconnecting in' }).waitFor();
    server = await startServer(addr, db);
    await page.locator('#conn[data-state="live"]').waitFor({ timeout: 45_000 });
    // The agents were disconnected by the restart; presence reloads on reconnect.
    await page.locator('#agent-list li[data-username="e2e-streamer"][data-online="false"]').waitFor();

    assert.deepEqual(pageErrors, [], 'no JavaScript errors on the page');
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
});
