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
import { mkdtempSync, mkdirSync, rmSync, existsSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { BIN, PYTHON, CHROMIUM, SHOTS, WAIT, startServer, stop, startAgent, sh, visibleRows, apiCall } from './harness.mjs';

const UTC_TITLE = /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC$/;
const RELATIVE = /^(just now|\d+ min ago|\d+ h ago)$/;

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
    const context = await browser.newContext({ viewport: { width: 1366, height: 900 }, acceptDownloads: true });
    await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: base });
    const page = await context.newPage();
    page.setDefaultTimeout(WAIT);
    page.on('pageerror', (err) => pageErrors.push(String(err)));
    // The page runs under a strict Content-Security-Policy: anything it blocks is a bug.
    page.on('console', (msg) => {
      if (/Content.Security.Policy/i.test(msg.text())) pageErrors.push(msg.text());
    });
    page.on('dialog', (d) => d.accept());
    const log = page.locator('#log');
    const api = (method, p, body, jwt) => apiCall(base, method, p, body, jwt);

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

    step('empty states say what to do next (the Butler is not an agent)');
    await page.locator('#agents-empty', { hasText: 'No agents registered yet — register one below' }).waitFor();
    await log.locator('#log-empty', { hasText: 'No log lines yet — agents report with SYSTEM_LOG' }).waitFor();
    await page.locator('#chat-log .chat-empty', { hasText: 'No conversation open' }).waitFor();
    // The Butler never connected: its internal report code is shown in words.
    const butlerCard = page.locator('#agent-list li[data-username="Butler"]');
    assert.equal(await butlerCard.locator('.report').textContent(), 'Last report: Disconnected');
    assert.doesNotMatch(await page.locator('#agent-list').textContent(), /websocket_/);
    await page.getByLabel('Chat with', { exact: true }).selectOption({ label: 'Butler (Butler) — offline' });
    await page.locator('#chat-log .chat-empty', { hasText: 'No messages with the Butler yet' }).waitFor();
    await page.getByLabel('Search agents').fill('nobody-here');
    await page.locator('#agents-empty', { hasText: 'No agents match “nobody-here”.' }).waitFor();
    await page.getByRole('button', { name: 'Clear the search' }).click();
    await page.locator('#agents-empty', { hasText: 'No agents registered yet' }).waitFor();

    step('register an agent through the API');
    const { token: jwt, user: admin } = await api('POST', '/api/auth/login', { username: 'admin', password: 'admin123' });
    const streamer = await api('POST', '/api/users/agents',
      { username: 'e2e-streamer', agent_kind: 'python-test', description: 'answers with streamed replies' }, jwt);
    assert.match(streamer.api_token, /^ec_[0-9a-f]{64}$/);

    step('register another agent through the UI; the token card gives the next steps');
    await page.locator('#agents-empty').getByRole('button', { name: 'Register an agent' }).click();
    const register = page.locator('#register-form');
    await register.getByLabel('Username').fill('e2e-offline');
    await register.getByLabel('Agent kind (optional)').fill('sleeper');
    await register.getByRole('button', { name: 'Register', exact: true }).click();
    await page.locator('#token-reveal').waitFor({ state: 'visible' });
    const shown = await page.locator('#token-value').textContent();
    assert.match(shown, /^ec_[0-9a-f]{64}$/, 'the new token is shown');
    const connectLine = await page.locator('#token-connect').textContent();
    assert.equal(connectLine, `ws://${server.addr}/api/ws?token=${shown}`, 'the connect line names this server');
    const curlLine = await page.locator('#token-curl').textContent();
    assert.equal(curlLine, `curl -fsS -H "Authorization: Bearer ${shown}" -H 'Content-Type: application/json' `
      + `-d '{"level":"INFO","content":"hello"}' ${base}/api/messages`);
    await page.getByRole('button', { name: 'Copy connect line' }).click();
    await page.locator('#token-copied', { hasText: 'Copied the connect line.' }).waitFor();
    assert.equal(await page.evaluate(() => navigator.clipboard.readText()), connectLine);
    await page.getByRole('button', { name: 'Copy curl command' }).click();
    await page.locator('#token-copied', { hasText: 'Copied the curl command.' }).waitFor();
    await page.locator('#token-reveal').screenshot({ path: path.join(SHOTS, 'dashboard-token.png') });
    // The curl command works as pasted: its line shows up live.
    await sh(curlLine);
    await log.locator('.log-row[data-level="INFO"]', { hasText: 'hello' }).filter({ has: page.locator('.src', { hasText: 'e2e-offline' }) }).waitFor();
    await page.locator('#log-empty').waitFor({ state: 'hidden' });
    await page.getByRole('button', { name: 'Done' }).click();
    await page.locator('#token-reveal').waitFor({ state: 'hidden' });
    for (const id of ['#token-value', '#token-connect', '#token-curl']) {
      assert.equal(await page.locator(id).textContent(), '', `${id} is gone after Done`);
    }
    const offlineCard = page.locator('#agent-list li[data-username="e2e-offline"]');
    await offlineCard.waitFor();
    assert.equal(await offlineCard.getAttribute('data-online'), 'false');
    assert.match(await offlineCard.textContent(), /kind: sleeper/);
    await page.locator('#agents-empty').waitFor({ state: 'hidden' });

    step('start the Python agent; it comes online, its SYSTEM_LOG appears live, online agents sort first');
    const agent = startAgent(base, streamer.api_token, 'e2e-streamer');
    procs.push(agent);
    const card = page.locator('#agent-list li[data-username="e2e-streamer"][data-online="true"]');
    await card.waitFor();
    await card.locator('.presence', { hasText: 'online' }).waitFor();
    await log.locator('.log-row[data-level="SUCCESS"]', { hasText: 'e2e-streamer online' }).waitFor();
    await card.locator('.report', { hasText: 'e2e-streamer online' }).waitFor();
    const order = () => page.locator('#agent-list > li').evaluateAll((els) => els.map((e) => e.dataset.username));
    assert.deepEqual(await order(), ['e2e-streamer', 'Butler', 'e2e-offline'], 'online first, then by name');
    // Relative times, with the absolute UTC time on hover.
    const active = card.locator('.meta time');
    assert.match(await active.textContent(), RELATIVE);
    assert.match(await active.getAttribute('title'), UTC_TITLE);
    const rowTime = log.locator('.log-row', { hasText: 'e2e-streamer online' }).locator('time');
    assert.match(await rowTime.textContent(), RELATIVE);
    const iso = await rowTime.getAttribute('datetime');
    assert.equal(await rowTime.getAttribute('title'), iso.replace('T', ' ').replace('Z', ' UTC'));

    step('chat: the streamed reply renders while it streams and merges with the final CHAT');
    await card.getByRole('button', { name: 'Chat with e2e-streamer' }).click();
    await page.locator('#chat-status[data-online="true"]').waitFor();
    await page.locator('#chat-log .chat-empty', { hasText: 'No messages with e2e-streamer yet' }).waitFor();
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
    assert.equal(await page.locator('#chat-log .chat-empty').count(), 0);
    await log.locator('.log-row', { hasText: 'e2e-streamer handled chat #1' }).waitFor();

    step('an offline agent is marked and the outgoing message is queued');
    await page.getByLabel('Chat with', { exact: true }).selectOption({ label: 'e2e-offline — offline' });
    await page.locator('#chat-status[data-online="false"]', { hasText: 'offline' }).waitFor();
    await page.getByLabel('Message', { exact: true }).fill('are you there?');
    await page.getByLabel('Message', { exact: true }).press('Enter');
    const queued = page.locator('#chat-log .msg[data-sender="me"][data-status="queued"]', { hasText: 'are you there?' });
    await queued.waitFor();
    await queued.locator('.state', { hasText: 'queued, will be delivered when e2e-offline connects' }).waitFor();
    await page.locator('#chat-log .msg[data-sender="me"][data-status="queued"][data-msg-id]').waitFor(); // stored

    step('the agent connects with the connect line from the token card and gets the queued message');
    procs.push(startAgent(null, connectLine, 'e2e-offline'));
    await page.locator('#agent-list li[data-username="e2e-offline"][data-online="true"]').waitFor();
    await page.locator('#chat-log .msg[data-sender="me"][data-msg-id]:not([data-status])', { hasText: 'are you there?' }).waitFor();
    await replyDone.filter({ hasText: 'Echo: are you there? (3 chunks)' }).waitFor();

    step('Butler approvals: AUTH_REQUEST card, approve, the Butler hears it');
    const butlerRow = (await api('GET', '/api/users/agents', undefined, jwt)).find((u) => u.role === 'BUTLER');
    const rotated = await api('PATCH', `/api/users/agents/${butlerRow.id}/token`, {}, jwt);
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
    await log.locator('.log-row[data-level="AUTH"]', { hasText: 'auth response received: approved' }).waitFor();

    step('log filters and search');
    // A time element two hours old: the periodic refresh must rewrite its text (checked later).
    await page.evaluate(() => {
      const t = document.createElement('time');
      t.id = 'e2e-old-time';
      t.setAttribute('data-rel', '');
      t.setAttribute('datetime', new Date(Date.now() - 2 * 3600e3 - 5000).toISOString());
      t.textContent = 'just now';
      t.hidden = true;
      document.body.append(t);
    });
    const levelButton = page.locator('#log-level-btn');
    const levelBox = (name) => page.locator('#log-level-menu').getByRole('checkbox', { name, exact: true });
    /** Waits until the log shows at least one row and every row passes: levels (any of) and text (substring). */
    const everyRow = (want) => page.waitForFunction(({ levels, text }) => {
      const rows = [...document.querySelectorAll('#log .log-row')].filter((r) => !r.hidden);
      return rows.length >= 1 && rows.every((r) => (!levels || levels.includes(r.dataset.level))
        && (!text || r.querySelector('.text').textContent.includes(text)));
    }, { levels: want.levels || null, text: want.text || null });
    await page.getByLabel('Search the log').fill('handled chat');
    await everyRow({ text: 'handled chat' });
    await page.getByLabel('Search the log').fill('');
    await levelButton.click();
    await levelBox('AUTH').check();
    await everyRow({ levels: ['AUTH'] });
    assert.equal(await levelButton.textContent(), 'Levels: AUTH');
    await page.locator('#log-level-all').click();
    await page.keyboard.press('Escape');
    await page.locator('#log-level-menu').waitFor({ state: 'hidden' });
    await log.locator('.log-row', { hasText: 'e2e-streamer online' }).waitFor();

    step('new log lines do not move the view while the user is scrolled away');
    for (let i = 0; i < 60; i++) {
      await api('POST', '/api/messages', { agent_id: 'e2e-bulk', level: 'DEBUG', content: `bulk line ${i}` }, jwt);
    }
    await log.locator('.log-row', { hasText: 'bulk line 59' }).waitFor();
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
      await api('POST', '/api/messages', { agent_id: 'e2e-bulk', level: 'DEBUG', content: `bulk line ${i}` }, jwt);
    }
    await log.locator('.log-row', { hasText: 'bulk line 64' }).waitFor({ state: 'attached' });
    await page.locator('#log-jump', { hasText: 'new' }).waitFor();
    const after = await page.evaluate((id) => {
      const b = document.getElementById('log');
      return { top: b.querySelector(`[data-log-id="${id}"]`).getBoundingClientRect().top, scrollTop: b.scrollTop };
    }, anchor.id);
    assert.ok(Math.abs(after.top - anchor.top) < 1, `row moved from ${anchor.top} to ${after.top}`);
    assert.equal(after.scrollTop, anchor.scrollTop);
    await page.locator('#log-jump').click();
    await page.locator('#log-jump').waitFor({ state: 'hidden' });
    await api('POST', '/api/messages', { agent_id: 'e2e-bulk', level: 'WARNING', content: 'bulk line 65' }, jwt);
    await log.locator('.log-row', { hasText: 'bulk line 65' }).waitFor();
    await page.waitForFunction(() => { const b = document.getElementById('log'); return b.scrollHeight - b.scrollTop - b.clientHeight < 24; });

    step('the level filter lists levels seen live, and takes several at once');
    await levelButton.click();
    assert.equal(await levelBox('CRITICAL').count(), 0, 'CRITICAL was never seen');
    await api('POST', '/api/messages', { agent_id: 'e2e-storage', level: 'CRITICAL', content: 'disk /dev/sdb failed' }, jwt);
    await api('POST', '/api/messages', { agent_id: 'e2e-storage', level: 'ERROR', content: 'backup could not write' }, jwt);
    await levelBox('CRITICAL').waitFor();
    await log.locator('.log-row[data-level="ERROR"]', { hasText: 'backup could not write' }).waitFor();
    const levelsShown = await page.locator('#log-level-options input').evaluateAll((els) => els.map((e) => e.value));
    for (const lv of ['DEBUG', 'INFO', 'SUCCESS', 'AUTH', 'WARNING', 'ERROR', 'CRITICAL']) assert.ok(levelsShown.includes(lv), `${lv} in ${levelsShown}`);
    const twoLevels = page.waitForRequest((r) => /\/api\/messages\?.*level=ERROR%2CCRITICAL|level=CRITICAL%2CERROR/.test(r.url()));
    await levelBox('ERROR').check();
    await levelBox('CRITICAL').check();
    await twoLevels;
    await everyRow({ levels: ['ERROR', 'CRITICAL'] });
    await log.locator('.log-row[data-level="CRITICAL"]', { hasText: 'disk /dev/sdb failed' }).waitFor();
    await log.locator('.log-row[data-level="ERROR"]', { hasText: 'backup could not write' }).waitFor();
    assert.equal(await levelButton.textContent(), 'Levels: ERROR, CRITICAL');
    // A live line at one of the chosen levels joins the view; others do not.
    await api('POST', '/api/messages', { agent_id: 'e2e-storage', level: 'INFO', content: 'not shown while filtered' }, jwt);
    await api('POST', '/api/messages', { agent_id: 'e2e-storage', level: 'CRITICAL', content: 'second disk failed' }, jwt);
    await log.locator('.log-row[data-level="CRITICAL"]', { hasText: 'second disk failed' }).waitFor();
    assert.equal(await log.locator('.log-row', { hasText: 'not shown while filtered' }).count(), 0);
    await page.locator('#log-level-all').click();
    await page.keyboard.press('Escape');
    await log.locator('.log-row', { hasText: 'not shown while filtered' }).waitFor();

    step('a long line is clamped and expands');
    const longText = 'START ' + Array.from({ length: 550 }, (_, i) => `word${i}`).join(' ') + ' END';
    assert.ok(longText.length > 4096, `${longText.length} characters`);
    await api('POST', '/api/messages', { agent_id: 'e2e-storage', level: 'WARNING', content: longText }, jwt);
    const longRow = log.locator('.log-row', { hasText: 'START word0' });
    await longRow.waitFor();
    const more = longRow.getByRole('button', { name: 'Show more' });
    await more.waitFor();
    const clamped = await page.evaluate(() => {
      const row = [...document.querySelectorAll('#log .log-row')].find((r) => r.textContent.includes('START word0'));
      const t = row.querySelector('.text');
      return { row: row.getBoundingClientRect().height, text: t.getBoundingClientRect().height, line: parseFloat(getComputedStyle(t).lineHeight), box: document.getElementById('log').clientHeight };
    });
    assert.ok(clamped.text <= clamped.line * 3 + 2, `clamped to three lines: ${JSON.stringify(clamped)}`);
    assert.ok(clamped.row < clamped.box / 4, `the row does not fill the panel: ${JSON.stringify(clamped)}`);
    await more.click();
    await longRow.getByRole('button', { name: 'Show less' }).waitFor();
    assert.equal(await longRow.getByRole('button', { name: 'Show less' }).getAttribute('aria-expanded'), 'true');
    const expanded = await longRow.locator('.text').evaluate((t) => t.getBoundingClientRect().height);
    assert.ok(expanded > clamped.text * 4, `expanded: ${expanded} > ${clamped.text}`);
    assert.ok(await longRow.locator('.text', { hasText: 'word549 END' }).isVisible());
    await longRow.getByRole('button', { name: 'Show less' }).click();
    await more.waitFor();
    // Short lines get no button.
    assert.equal(await log.locator('.log-row', { hasText: 'bulk line 65' }).locator('.more').isVisible(), false);

    step('a time range filters the log (since / until)');
    const last15 = page.waitForRequest((r) => r.url().includes('/api/messages?') && r.url().includes('since='));
    await page.getByLabel('Time', { exact: true }).selectOption('15m');
    const since = new URL((await last15).url()).searchParams.get('since');
    assert.ok(Math.abs(Date.parse(since) - (Date.now() - 15 * 60e3)) < 60e3, `since ${since}`);
    await log.locator('.log-row', { hasText: 'bulk line 65' }).waitFor();
    const markA = await api('POST', '/api/messages', { agent_id: 'e2e-range', level: 'INFO', content: 'range marker A' }, jwt);
    const cut = Math.ceil((Date.parse(markA.timestamp) + 1) / 1000) * 1000; // the next whole second
    await page.waitForFunction((t) => Date.now() > t + 50, cut, { timeout: 3000 });
    const markB = await api('POST', '/api/messages', { agent_id: 'e2e-range', level: 'INFO', content: 'range marker B' }, jwt);
    assert.ok(Date.parse(markB.timestamp) >= cut);
    const local = await page.evaluate((t) => {
      const d = new Date(t);
      const p = (n) => String(n).padStart(2, '0');
      return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
    }, cut);
    await page.getByLabel('Time', { exact: true }).selectOption('custom');
    await page.getByLabel('From', { exact: true }).fill(local);
    await page.getByLabel('To', { exact: true }).fill('');
    await page.getByRole('button', { name: 'Apply', exact: true }).click();
    await page.waitForFunction(() => {
      const rows = [...document.querySelectorAll('#log .log-row')];
      return rows.length === 1 && rows[0].textContent.includes('range marker B');
    });
    await page.getByLabel('From', { exact: true }).fill('');
    await page.getByLabel('To', { exact: true }).fill(local);
    await page.getByRole('button', { name: 'Apply', exact: true }).click();
    await log.locator('.log-row', { hasText: 'range marker A' }).waitFor();
    await log.locator('.log-row', { hasText: 'range marker B' }).waitFor({ state: 'detached' });
    for (const r of await visibleRows(page)) assert.ok(r.id < markB.id, `row ${r.id} is before the cut`);
    // A range with nothing in it says so.
    await page.getByLabel('From', { exact: true }).fill('2001-01-01T00:00:00');
    await page.getByLabel('To', { exact: true }).fill('2001-01-02T00:00:00');
    await page.getByRole('button', { name: 'Apply', exact: true }).click();
    await log.locator('#log-empty', { hasText: 'No log lines match the filters' }).waitFor();
    await log.getByRole('button', { name: 'Clear filters' }).click();
    await log.locator('.log-row', { hasText: 'range marker B' }).waitFor();
    assert.equal(await page.getByLabel('Time', { exact: true }).inputValue(), '');

    step('export: the filtered log as CSV and as NDJSON');
    await page.getByLabel('Search the log').fill('bulk line');
    await levelButton.click();
    await levelBox('DEBUG').check();
    await page.keyboard.press('Escape');
    await page.waitForFunction(() => document.querySelectorAll('#log .log-row').length === 65);
    const [csvDownload] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Export CSV' }).click()]);
    assert.match(csvDownload.suggestedFilename(), /^echocenter-log-\d{8}T\d{6}Z\.csv$/);
    const csv = readFileSync(await csvDownload.path(), 'utf8').split('\r\n').filter(Boolean);
    assert.equal(csv[0], 'id,timestamp,agent_id,level,content');
    assert.equal(csv.length, 66, 'a header and 65 rows');
    for (const [i, line] of csv.slice(1).entries()) {
      assert.match(line, new RegExp(`^\\d+,\\d{4}-[^,]+Z,e2e-bulk,DEBUG,bulk line ${i}$`));
    }
    await page.locator('#log-status', { hasText: 'Exported 65 lines as CSV (filtered).' }).waitFor();
    const [ndDownload] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Export NDJSON' }).click()]);
    assert.match(ndDownload.suggestedFilename(), /\.ndjson$/);
    const nd = readFileSync(await ndDownload.path(), 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
    assert.equal(nd.length, 65);
    assert.deepEqual(nd.map((r) => r.content), Array.from({ length: 65 }, (_, i) => `bulk line ${i}`));
    assert.ok(nd.every((r) => r.level === 'DEBUG' && r.agent_id === 'e2e-bulk' && r.id > 0 && r.timestamp));
    await page.locator('#log-status', { hasText: 'Exported 65 lines as NDJSON (filtered).' }).waitFor();
    await page.getByLabel('Search the log').fill('');
    await levelButton.click();
    await page.locator('#log-level-all').click();
    await page.keyboard.press('Escape');
    await log.locator('.log-row', { hasText: 'range marker B' }).waitFor();

    step('50 agents: compact list, search, online first, on 1440×900');
    await page.locator('#approval-list').getByRole('button', { name: 'Dismiss' }).click();
    await page.locator('#approvals').waitFor({ state: 'hidden' });
    for (let i = 1; i <= 45; i++) {
      await api('POST', '/api/users/agents', { username: `fleet-${String(i).padStart(2, '0')}`, description: `fleet worker ${i}` }, jwt);
    }
    await page.setViewportSize({ width: 1440, height: 900 });
    await page.getByRole('button', { name: 'Refresh' }).click();
    await page.locator('#agent-list li[data-username="fleet-45"]').waitFor();
    // Many agents: the list is compact unless the user chose cards.
    await page.locator('#agent-list.compact').waitFor();
    const compactButton = page.getByRole('button', { name: 'Compact list' });
    assert.equal(await compactButton.getAttribute('aria-pressed'), 'true');
    await compactButton.click();
    await page.locator('#agent-list:not(.compact)').waitFor();
    const cardHeight = await page.locator('#agent-list li[data-username="fleet-01"]').evaluate((e) => e.getBoundingClientRect().height);
    await compactButton.click();
    await page.locator('#agent-list.compact').waitFor();
    const sizes = await page.evaluate(() => {
      const body = document.getElementById('agents-body').getBoundingClientRect();
      const rows = [...document.querySelectorAll('#agent-list > li')].map((li) => li.getBoundingClientRect());
      const lis = [...document.querySelectorAll('#agent-list > li')];
      const tallest = lis.reduce((a, b) => (b.getBoundingClientRect().height > a.getBoundingClientRect().height ? b : a));
      return {
        heights: rows.map((r) => r.height), visible: rows.filter((r) => r.top >= body.top && r.bottom <= body.bottom).length,
        tallest: tallest.dataset.username + ' ' + tallest.innerText.replace(/\s+/g, ' '),
      };
    });
    assert.equal(sizes.heights.length, 48);
    assert.ok(Math.max(...sizes.heights) <= 40, `compact rows are one line: ${Math.max(...sizes.heights)} px, ${sizes.tallest} (cards: ${cardHeight} px)`);
    assert.ok(sizes.visible >= 18, `${sizes.visible} agents visible at once`);
    const names = await order();
    assert.deepEqual(names.slice(0, 3), ['Butler', 'e2e-offline', 'e2e-streamer'], 'online agents first');
    assert.deepEqual(names.slice(3, 6), ['fleet-01', 'fleet-02', 'fleet-03'], 'then the others by name');
    // "More" opens one row.
    const fleet7 = page.locator('#agent-list li[data-username="fleet-07"]');
    assert.equal(await fleet7.locator('.description').isVisible(), false);
    await fleet7.getByRole('button', { name: 'More details for fleet-07' }).click();
    await fleet7.locator('.description', { hasText: 'fleet worker 7' }).waitFor();
    await fleet7.getByRole('button', { name: 'Fewer details for fleet-07' }).click();
    await fleet7.locator('.description').waitFor({ state: 'hidden' });
    await page.getByLabel('Search agents').fill('fleet-1');
    await page.waitForFunction(() => document.querySelectorAll('#agent-list > li').length === 10);
    assert.deepEqual(await order(), Array.from({ length: 10 }, (_, i) => `fleet-1${i}`));
    await page.locator('#agents-count', { hasText: '10 shown' }).waitFor();
    await page.getByLabel('Search agents').fill('worker 4');
    await page.waitForFunction(() => document.querySelectorAll('#agent-list > li').length === 7); // 4, 40-45
    await page.getByLabel('Search agents').fill('');
    await page.waitForFunction(() => document.querySelectorAll('#agent-list > li').length === 48);

    step('relative times are refreshed periodically');
    await page.waitForFunction(() => document.getElementById('e2e-old-time').textContent === '2 h ago', null, { timeout: 20_000 });
    await page.evaluate(() => document.getElementById('e2e-old-time').remove());

    step('screenshot');
    await page.evaluate(() => document.activeElement && document.activeElement.blur());
    await page.getByLabel('Chat with', { exact: true }).selectOption({ label: 'e2e-streamer — online' });
    await replyDone.filter({ hasText: final }).waitFor();
    await page.evaluate(() => { const b = document.getElementById('log'); b.scrollTop = b.scrollHeight; });
    await page.screenshot({ path: path.join(SHOTS, 'dashboard.png') });
    await page.setViewportSize({ width: 1366, height: 900 });

    step('after a reload the final message comes from history; older log lines load on request');
    for (let i = 0; i < 150; i++) {
      await api('POST', '/api/messages', { agent_id: 'e2e-filler', level: 'DEBUG', content: `filler ${i}` }, jwt);
    }
    await log.locator('.log-row', { hasText: 'filler 149' }).waitFor();
    await page.evaluate(() => localStorage.setItem('echocenter.exportCap', '10'));
    await page.reload();
    await page.locator('#conn[data-state="live"]').waitFor();
    // The open conversation is restored.
    await page.waitForFunction((id) => document.getElementById('chat-peer').value === id, String(streamer.id));
    await replyDone.filter({ hasText: final }).waitFor();
    await page.locator('#chat-log .msg[data-sender="me"][data-msg-id]', { hasText: 'hello from e2e' }).waitFor();
    assert.equal(await page.locator('#chat-log .msg[data-sender="peer"]').count(), 1, 'one reply bubble, not chunks');
    // The answered approval is not offered again.
    assert.equal(await page.locator('#approval-list li').count(), 0);
    // The first page is the newest 200 lines; the agent's first line is older.
    await page.waitForFunction(() => document.querySelectorAll('#log .log-row').length === 200);
    assert.equal(await log.locator('.log-row', { hasText: 'e2e-streamer online' }).count(), 0);
    const before = await page.evaluate(() => {
      const b = document.getElementById('log');
      b.scrollTop = 0;
      const first = b.querySelector('.log-row');
      return { id: first.dataset.logId, top: first.getBoundingClientRect().top };
    });
    await log.getByRole('button', { name: 'Load older lines' }).click();
    await log.locator('.log-row', { hasText: 'e2e-streamer online' }).waitFor({ state: 'attached' });
    const kept = await page.evaluate((id) => {
      const b = document.getElementById('log');
      return { top: b.querySelector(`[data-log-id="${id}"]`).getBoundingClientRect().top, scrollTop: b.scrollTop, rows: b.querySelectorAll('.log-row').length };
    }, before.id);
    assert.ok(Math.abs(kept.top - before.top) < 1, `the first row stayed in place: ${before.top} -> ${kept.top}`);
    assert.ok(kept.scrollTop > 0 && kept.rows > 200);
    // Everything is loaded now: the top of the view says so.
    await log.locator('#log-older-status', { hasText: 'Beginning of the log.' }).waitFor();
    const total = (await api('GET', '/api/messages?limit=200', undefined, jwt)).length
      + (await api('GET', `/api/messages?limit=200&before_id=${before.id}`, undefined, jwt)).length;
    assert.equal(kept.rows, total);

    step('the export stops at its cap and says so');
    const [capped] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Export NDJSON' }).click()]);
    const cappedRows = readFileSync(await capped.path(), 'utf8').split('\n').filter(Boolean);
    assert.equal(cappedRows.length, 10);
    assert.equal(JSON.parse(cappedRows[9]).content, 'filler 149', 'the newest lines, oldest first');
    await page.locator('#log-status', { hasText: 'the export stops at 10 lines' }).waitFor();
    await page.evaluate(() => localStorage.removeItem('echocenter.exportCap'));

    step('readable on a phone: no horizontal scrolling');
    await page.setViewportSize({ width: 390, height: 844 });
    await page.waitForFunction(() => document.documentElement.scrollWidth <= window.innerWidth);
    await levelButton.click();
    await page.waitForFunction(() => document.documentElement.scrollWidth <= window.innerWidth);
    await page.keyboard.press('Escape');
    await page.evaluate(() => { const b = document.getElementById('log'); b.scrollTop = b.scrollHeight; document.activeElement && document.activeElement.blur(); });
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-mobile.png'), fullPage: true });
    await page.setViewportSize({ width: 1366, height: 900 });

    step('disconnected: presence unknown, a banner, back-off; presence reloads on reconnect');
    const addr = server.addr;
    await stop(server.child);
    await page.locator('#offline-banner', { hasText: 'Disconnected — presence unknown, reconnecting…' }).waitFor();
    await page.locator('#offline-banner', { hasText: 'Next attempt in' }).waitFor();
    await page.locator('#conn[data-state="down"]', { hasText: 'retry in' }).waitFor();
    await page.waitForFunction(() => {
      const cards = [...document.querySelectorAll('#agent-list > li')];
      return cards.length === 48 && cards.every((c) => c.dataset.online === 'unknown');
    });
    const streamerPresence = page.locator('#agent-list li[data-username="e2e-streamer"] .presence');
    assert.equal(await streamerPresence.textContent(), 'unknown', 'compact rows say it short');
    await compactButton.click();
    await page.locator('#agent-list:not(.compact)').waitFor();
    assert.equal(await streamerPresence.textContent(), 'presence unknown');
    await page.locator('#chat-status[data-online="unknown"]', { hasText: 'presence is unknown' }).waitFor();
    await page.locator('#agents-count', { hasText: 'presence unknown' }).waitFor();
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-disconnected.png') });
    server = await startServer(addr, db);
    await page.locator('#conn[data-state="live"]').waitFor({ timeout: 45_000 });
    await page.locator('#offline-banner').waitFor({ state: 'hidden' });
    // The agents were disconnected by the restart; presence reloads on reconnect.
    await page.locator('#agent-list li[data-username="e2e-streamer"][data-online="false"]').waitFor();
    await page.locator('#agent-list li[data-username="Butler"][data-online="false"]').waitFor();
    assert.equal(await page.locator('#agent-list li[data-online="unknown"]').count(), 0);
    await page.locator('#chat-status[data-online="false"]').waitFor();

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
