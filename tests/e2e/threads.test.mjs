// End-to-end tests of conversation threads, approval cards, custom frame types and BUSY
// presence on the dashboard, in a real browser against the real binary (see harness.mjs):
//
// - threads: a peer with no thread opens a draft that becomes the default thread with the
//   first message; New thread, inline rename, pin/unpin, archive/unarchive behind "Show
//   archived"; the integration guide's Python agent (its example, unchanged but for the
//   token and the address) answers inside the non-default thread the human is looking at; a
//   streamed reply for another thread marks that thread unread and moves it up instead of
//   showing in the open one; delivery states (queued, delivered) inside threads; "Load
//   older messages" with before_id;
// - a custom frame type (WEATHER_UPDATE) as its own live-only row in the log; an agent's
//   BUSY pill, set and cleared live by PRESENCE;
// - approvals: cards with their final status in the Butler's thread and above the panels:
//   approved through the UI (two clicks), rejected, answered elsewhere (the server's
//   refusal is shown), EXPIRED after a server restart, and EXPIRED live (AUTH_STATUS_UPDATE)
//   after a short --approval-ttl.
//
// Run: scripts/e2e.sh.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, mkdirSync, rmSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { tmpdir } from 'node:os';
import path from 'node:path';
import {
  root, BIN, PYTHON, CHROMIUM, SHOTS, capture, startServer, stop, startAgent, apiCall, launchBrowser, watchedPage, uiLogin,
} from './harness.mjs';

const step = (name) => console.log(`step: ${name}`);

/** A server on a fresh database and a browser; run(world) does the rest. */
async function withWorld(run) {
  assert.ok(existsSync(BIN), `server binary not found at ${BIN} (cargo build, or set ECHOCENTER_BIN)`);
  assert.ok(existsSync(PYTHON), `python not found at ${PYTHON} (set ECHOCENTER_TEST_PYTHON)`);
  assert.ok(existsSync(CHROMIUM), `chromium not found at ${CHROMIUM} (apt-get install chromium)`);
  mkdirSync(SHOTS, { recursive: true });
  const dir = mkdtempSync(path.join(tmpdir(), 'echocenter-e2e-'));
  const db = path.join(dir, 'e2e.db');
  const procs = [];
  const errors = [];
  const world = { dir, db, procs, errors, server: null };
  let browser = null;
  try {
    world.server = await startServer('127.0.0.1:0', db);
    const base = `http://${world.server.addr}`;
    browser = await launchBrowser();
    world.base = base;
    world.api = (method, p, body, jwt) => apiCall(base, method, p, body, jwt);
    world.open = async (name, viewport) => {
      const context = await browser.newContext({ viewport: viewport || { width: 1440, height: 900 } });
      const page = await watchedPage(context, errors, name);
      await page.goto(base + '/');
      return page;
    };
    await run(world);
    assert.deepEqual(errors, [], 'no JavaScript errors and nothing blocked on the pages');
  } catch (err) {
    const dumps = [world.server?.out?.dump?.(), ...procs.map((p) => p.out.dump())].filter(Boolean).join('\n');
    err.message += '\n' + dumps;
    throw err;
  } finally {
    if (browser) await browser.close().catch(() => {});
    for (const p of procs) await stop(p.child);
    if (world.server) await stop(world.server.child);
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The integration guide's Python example, as tests/guide_example.rs runs it: the file with
 *  only the token and the server's address filled in. */
function startGuideAgent(dir, base, token) {
  const script = readFileSync(path.join(root, 'tests', 'guide', 'agent.py'), 'utf8')
    .replace('your_token_here', token)
    .replace('localhost:8080', base.replace(/^http:\/\//, ''));
  const file = path.join(dir, 'guide_agent.py');
  writeFileSync(file, script);
  const child = spawn(PYTHON, ['-u', file], { stdio: ['ignore', 'pipe', 'pipe'] });
  return { child, out: capture(child, 'guide agent') };
}

/** Helpers on the chat panel of a page. */
function chatOf(page) {
  const row = (title) => page.locator(`#thread-list > li[data-title="${title}"]`);
  return {
    row,
    order: () => page.$$eval('#thread-list > li', (els) => els.map((e) => e.dataset.title)),
    current: () => page.locator('#thread-list > li[aria-current="true"]').getAttribute('data-title'),
    open: async (title) => {
      await row(title).locator('.thread-open').click();
      await row(title).and(page.locator('[aria-current="true"]')).waitFor();
    },
    send: async (text) => {
      await page.getByLabel('Message', { exact: true }).fill(text);
      await page.getByLabel('Message', { exact: true }).press('Enter');
    },
    mine: (text) => page.locator('#chat-log .msg[data-sender="me"]', { hasText: text }),
    theirs: (text) => page.locator('#chat-log .msg[data-sender="peer"]', { hasText: text }),
    newThread: async () => {
      const before = await page.locator('#thread-list > li').count();
      await page.getByRole('button', { name: 'New thread' }).click();
      await page.waitForFunction((n) => document.querySelectorAll('#thread-list > li').length === n + 1, before);
    },
    rename: async (from, to) => {
      await page.getByRole('button', { name: `Rename thread ${from}` }).click();
      const input = page.locator('#thread-list > li.editing').getByLabel(`New title for ${from}`);
      await input.waitFor();
      await input.fill(to);
      await input.press('Enter');
      await row(to).waitFor();
    },
  };
}

test('threads: list, new, rename, pin, archive; the guide agent answers in the open thread; unread; delivery; older; custom frames; busy',
  { timeout: 300_000 }, () => withWorld(async ({ dir, base, api, open, procs }) => {
    const { token: jwt } = await api('POST', '/api/auth/login', { username: 'admin', password: 'admin123' });
    const guide = await api('POST', '/api/users/agents', { username: 'guide-agent', description: 'the integration guide’s example' }, jwt);
    const streamer = await api('POST', '/api/users/agents', { username: 'e2e-streamer' }, jwt);
    const quiet = await api('POST', '/api/users/agents', { username: 'e2e-quiet' }, jwt);
    const archive = await api('POST', '/api/users/agents', { username: 'e2e-archivist' }, jwt);
    const weather = await api('POST', '/api/users/agents', { username: 'e2e-weather' }, jwt);
    const threadsOf = (peerId) => api('GET', `/api/chat/threads?peer_id=${peerId}`, undefined, jwt);
    const messagesOf = (tid) => api('GET', `/api/chat/threads/${tid}/messages`, undefined, jwt);

    const page = await open('admin');
    await uiLogin(page, 'admin', 'admin123');
    await page.locator('#conn[data-state="live"]').waitFor();
    const chat = chatOf(page);

    step('the guide agent: a peer with no thread opens a draft; the first message makes the default thread');
    procs.push(startGuideAgent(dir, base, guide.api_token));
    await page.locator('#agent-list li[data-username="guide-agent"][data-online="true"]').waitFor();
    await page.getByRole('button', { name: 'Chat with guide-agent' }).click();
    await page.locator('#threads-empty', { hasText: 'No threads with guide-agent yet' }).waitFor();
    await page.locator('#chat-log .chat-empty', { hasText: 'No messages with guide-agent yet' }).waitFor();
    await chat.send('Please execute system scan.');
    await chat.row('New conversation').and(page.locator('[data-default="true"][aria-current="true"]')).waitFor();
    await chat.row('New conversation').locator('.badge.t-default', { hasText: 'default' }).waitFor();
    await chat.theirs('Roger that!').waitFor();
    await chat.mine('Please execute system scan.').and(page.locator('[data-msg-id]')).waitFor();
    const [defaultThread] = await threadsOf(guide.id);
    assert.equal(defaultThread.is_default, true);

    step('New thread, renamed inline: the guide agent answers inside it, the thread on screen');
    await chat.newThread();
    assert.deepEqual(await chat.order(), ['New conversation', 'New conversation'], 'the new thread starts at the top');
    const fresh = page.locator('#thread-list > li[data-default="false"]');
    assert.equal(await fresh.getAttribute('aria-current'), 'true', 'and is open');
    await page.locator('#chat-log .chat-empty', { hasText: 'No messages in “New conversation” yet' }).waitFor();
    // Escape cancels a rename.
    await page.getByRole('button', { name: 'Rename thread New conversation' }).click();
    const editing = page.locator('#thread-list > li.editing').getByLabel('New title for New conversation');
    await editing.fill('never saved');
    await editing.press('Escape');
    await fresh.locator('.thread-title', { hasText: 'New conversation' }).waitFor();
    await chat.rename('New conversation', 'Disk check');
    const disk = (await threadsOf(guide.id)).find((t) => t.title === 'Disk check');
    assert.ok(disk && !disk.is_default, 'the title is stored');
    await chat.send('check the disk');
    await chat.mine('check the disk').and(page.locator('[data-msg-id]')).waitFor();
    await chat.theirs('Roger that!').waitFor();
    assert.equal(await chat.current(), 'Disk check');
    assert.equal(await page.locator('#chat-log .msg').count(), 2, 'only this thread’s two messages');
    const inDisk = await messagesOf(disk.id);
    assert.deepEqual(inDisk.map((r) => r.payload), ['check the disk', 'Roger that!']);
    assert.equal(inDisk[1].sender_id, guide.id);
    assert.equal((await messagesOf(defaultThread.id)).length, 2, 'nothing new in the default thread');
    assert.deepEqual(await chat.order(), ['Disk check', 'New conversation'], 'latest message first');

    step('pin and unpin: pinned threads come first');
    await chat.open('New conversation');
    await chat.theirs('Roger that!').waitFor();
    await page.getByRole('button', { name: 'Pin thread New conversation' }).click();
    await chat.row('New conversation').locator('.badge.t-pin', { hasText: 'pinned' }).waitFor();
    assert.deepEqual(await chat.order(), ['New conversation', 'Disk check']);
    assert.equal((await threadsOf(guide.id))[0].is_pinned, true, 'the server lists it first too');
    await page.getByRole('button', { name: 'Unpin thread New conversation' }).click();
    await chat.row('New conversation').and(page.locator('[data-pinned="false"]')).waitFor();
    assert.deepEqual(await chat.order(), ['Disk check', 'New conversation']);

    step('archive: the thread goes behind "Show archived"; unarchive brings it back');
    await chat.open('Disk check');
    await page.getByRole('button', { name: 'Archive thread Disk check' }).click();
    await chat.row('Disk check').waitFor({ state: 'detached' });
    assert.equal(await chat.current(), 'New conversation', 'the view moved on');
    assert.ok((await threadsOf(guide.id)).find((t) => t.id === disk.id).archived_at, 'archived_at is set');
    const showArchived = page.getByLabel('Show archived');
    await showArchived.check();
    await chat.row('Disk check').locator('.badge.t-arch', { hasText: 'archived' }).waitFor();
    await chat.open('Disk check');
    await chat.theirs('Roger that!').waitFor();
    await page.getByRole('button', { name: 'Unarchive thread Disk check' }).click();
    await chat.row('Disk check').and(page.locator('[data-archived="false"]')).waitFor();
    await showArchived.uncheck();
    await page.locator('#threads-archived-wrap').waitFor({ state: 'hidden' });
    assert.deepEqual(await chat.order(), ['Disk check', 'New conversation']);

    step('a streamed reply for another thread marks it unread and moves it up, not into the open one');
    procs.push(startAgent(base, streamer.api_token, 'e2e-streamer', ['--delay', '2.5']));
    await page.locator('#agent-list li[data-username="e2e-streamer"][data-online="true"]').waitFor();
    await page.getByRole('button', { name: 'Chat with e2e-streamer' }).click();
    await page.locator('#chat-log .chat-empty', { hasText: 'No messages with e2e-streamer yet' }).waitFor();
    await chat.send('slow question');
    // The first chunk arrives at once, in the (new) default thread on screen...
    await page.locator('#chat-log .msg[data-sender="peer"][data-status="streaming"]').waitFor();
    await chat.row('New conversation').and(page.locator('[data-default="true"]')).waitFor();
    // ...then the user starts another thread; the rest of the stream is for the first one.
    await chat.newThread();
    await chat.rename('New conversation', 'Second');
    assert.equal(await chat.current(), 'Second');
    const first = chat.row('New conversation');
    await first.locator('.badge.unread', { hasText: '1' }).waitFor();
    await first.locator('.thread-mark').waitFor();
    assert.deepEqual(await chat.order(), ['New conversation', 'Second'], 'the thread with the news moved up');
    assert.equal(await page.locator('#chat-log .msg').count(), 0, 'nothing of it in the open thread');
    await page.locator('#agent-list li[data-username="e2e-streamer"] .badge.unread', { hasText: '1 new' }).waitFor();
    await chat.open('New conversation');
    await first.and(page.locator('[data-unread="false"]')).waitFor();
    await chat.theirs('Echo: slow question (3 chunks)').and(page.locator('[data-msg-id]:not([data-status])')).waitFor();
    assert.equal(await page.locator('#chat-log .msg[data-sender="peer"]').count(), 1, 'one bubble, not chunks');
    await page.locator('#agent-list li[data-username="e2e-streamer"] .badge.unread').waitFor({ state: 'hidden' });

    step('delivery states inside threads: queued in two threads, delivered when the agent connects');
    await page.getByLabel('Chat with', { exact: true }).selectOption({ label: 'e2e-quiet — offline' });
    await chat.send('wait for me');
    await chat.mine('wait for me').and(page.locator('[data-status="queued"][data-msg-id]')).waitFor();
    await chat.newThread();
    // Leaving the title field saves it, like Enter.
    await page.getByRole('button', { name: 'Rename thread New conversation' }).click();
    await page.locator('#thread-list > li.editing').getByLabel('New title for New conversation').fill('Later');
    await page.getByLabel('Message', { exact: true }).click();
    await chat.row('Later').locator('.thread-open').waitFor();
    await page.waitForFunction(() => document.activeElement === document.getElementById('chat-input'), null);
    assert.ok((await threadsOf(quiet.id)).some((t) => t.title === 'Later'), 'saved on the server');
    await chat.send('also wait');
    const alsoWait = chat.mine('also wait');
    await alsoWait.and(page.locator('[data-status="queued"][data-msg-id]')).waitFor();
    assert.equal(await alsoWait.locator('.state').textContent(), 'queued, will be delivered when e2e-quiet connects');
    procs.push(startAgent(base, quiet.api_token, 'e2e-quiet', ['--silent']));
    await page.locator('#agent-list li[data-username="e2e-quiet"][data-online="true"]').waitFor();
    await alsoWait.and(page.locator('[data-msg-id]:not([data-status])')).waitFor();
    await chat.open('New conversation');
    await chat.mine('wait for me').and(page.locator('[data-msg-id]:not([data-status])')).waitFor();

    step('load older messages: the first page is the newest 200, the rest comes with before_id');
    for (let i = 0; i < 230; i++) {
      await api('POST', '/api/dev/mock/chat', { sender_username: 'e2e-archivist', receiver_username: 'admin', content: `old report ${i}` }, jwt);
    }
    await page.getByLabel('Chat with', { exact: true }).selectOption({ label: 'e2e-archivist — offline' });
    await chat.theirs('old report 229').waitFor();
    await page.waitForFunction(() => document.querySelectorAll('#chat-log .msg').length === 200);
    assert.equal(await chat.theirs('old report 29').count(), 0);
    const olderBtn = page.getByRole('button', { name: 'Load older messages' });
    const before = await page.evaluate(() => {
      const box = document.getElementById('chat-log');
      box.scrollTop = 0;
      const m = box.querySelector('.msg');
      return { id: m.dataset.msgId, top: m.getBoundingClientRect().top };
    });
    await olderBtn.click();
    await page.waitForFunction(() => document.querySelectorAll('#chat-log .msg').length === 230);
    const kept = await page.evaluate((id) => document.querySelector(`#chat-log .msg[data-msg-id="${id}"]`).getBoundingClientRect().top, before.id);
    assert.ok(Math.abs(kept - before.top) < 2, `the first message stayed in place: ${before.top} -> ${kept}`);
    await olderBtn.waitFor({ state: 'detached' }); // all of it is loaded
    assert.equal(await page.locator('#chat-log .msg').first().locator('.body').textContent(), 'old report 0');
    assert.equal((await threadsOf(archive.id)).length, 1, 'all of it in the default thread');

    step('a custom frame type is its own live-only row in the log; BUSY shows as a pill');
    const readings = Array.from({ length: 40 }, (_, i) => ({ station: `st-${i}`, celsius: 10 + i / 4 }));
    procs.push(startAgent(base, weather.api_token, 'e2e-weather', ['--frames-by-chat',
      '--send', JSON.stringify({ type: 'AGENT_STATUS', payload: { status: 'BUSY' } }),
      '--send', JSON.stringify({ type: 'WEATHER_UPDATE', payload: { city: 'Oslo', celsius: 21.5, wind: 'NW 4 m/s' } }),
      '--send', JSON.stringify({ type: 'WEATHER_UPDATE', payload: { readings } })]));
    const weatherCard = page.locator('#agent-list li[data-username="e2e-weather"]');
    await weatherCard.locator('.badge.busy', { hasText: 'busy' }).waitFor();
    assert.equal(await weatherCard.getAttribute('data-busy'), 'true');
    const custom = page.locator('#log .log-row.custom[data-type="WEATHER_UPDATE"]');
    await custom.first().waitFor();
    await page.waitForFunction(() => document.querySelectorAll('#log .log-row.custom').length === 2);
    const short = custom.filter({ hasText: 'Oslo' });
    assert.equal(await short.locator('.badge.frame').textContent(), 'WEATHER_UPDATE');
    assert.equal(await short.locator('.text').textContent(), '{"city":"Oslo","celsius":21.5,"wind":"NW 4 m/s"}');
    assert.equal(await short.locator('.src').textContent(), 'e2e-weather');
    assert.match(await short.getAttribute('title'), /Live only: such frames are not stored/);
    // A long payload is clamped like a long line.
    const long = custom.filter({ hasText: 'readings' });
    await long.getByRole('button', { name: 'Show more' }).waitFor();
    await long.getByRole('button', { name: 'Show more' }).click();
    await long.getByRole('button', { name: 'Show less' }).waitFor();
    await long.getByRole('button', { name: 'Show less' }).click();
    // BUSY → IDLE, live.
    await page.getByRole('button', { name: 'Chat with e2e-weather' }).click();
    await page.locator('#chat-status', { hasText: 'e2e-weather is online and busy' }).waitFor();
    await chat.send('frame: ' + JSON.stringify({ type: 'AGENT_STATUS', payload: { status: 'IDLE' } }));
    await weatherCard.locator('.badge.busy').waitFor({ state: 'hidden' });
    await page.locator('#chat-status', { hasText: 'e2e-weather is online.' }).waitFor();
    await chat.send('frame: ' + JSON.stringify({ type: 'AGENT_STATUS', payload: { status: 'BUSY' } }));
    await weatherCard.locator('.badge.busy').waitFor();
    // Not stored: a reload drops the rows; BUSY comes back from the agent list.
    await page.reload();
    await page.locator('#conn[data-state="live"]').waitFor();
    await weatherCard.locator('.badge.busy', { hasText: 'busy' }).waitFor();
    await page.locator('#log .log-row', { hasText: 'e2e-weather online' }).waitFor();
    assert.equal(await page.locator('#log .log-row.custom').count(), 0, 'custom rows are live only');
    assert.equal(await page.locator('#chat-peer').inputValue(), String(weather.id), 'the open conversation is restored');
    await chat.send('frame: ' + JSON.stringify({ type: 'WEATHER_UPDATE', payload: { city: 'Bergen', celsius: 12, rain_mm: 3.5 } }));
    await custom.filter({ hasText: 'Bergen' }).waitFor();
    await chat.send('frame: ' + JSON.stringify({ type: 'WEATHER_UPDATE', payload: { readings } }));
    await custom.filter({ hasText: 'readings' }).getByRole('button', { name: 'Show more' }).waitFor();

    step('screenshots: threads on a desktop and on a phone');
    await page.getByRole('button', { name: 'Chat with e2e-streamer' }).click();
    await chat.row('Second').waitFor();
    // An archived thread behind the toggle, a pinned one, and news in the one not on screen.
    await chat.newThread();
    await chat.rename('New conversation', 'Old notes');
    await page.getByRole('button', { name: 'Archive thread Old notes' }).click();
    await chat.open('Second');
    await page.getByRole('button', { name: 'Pin thread Second' }).click();
    await chat.row('Second').and(page.locator('[data-pinned="true"]')).waitFor();
    await chat.send('how is the disk?');
    await chat.theirs('Echo: how is the disk? (3 chunks)').and(page.locator('[data-msg-id]:not([data-status])')).waitFor();
    await chat.open('New conversation');
    await chat.send('and the network?');
    await page.locator('#chat-log .msg[data-sender="peer"][data-status="streaming"]').waitFor();
    await chat.open('Second');
    await chat.row('New conversation').locator('.badge.unread', { hasText: '1' }).waitFor();
    await page.locator('#threads-archived-wrap', { hasText: 'Show archived (1)' }).waitFor();
    await page.evaluate(() => { document.activeElement && document.activeElement.blur(); const b = document.getElementById('log'); b.scrollTop = b.scrollHeight; });
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-threads.png') });

    await page.setViewportSize({ width: 390, height: 844 });
    await page.waitForFunction(() => document.documentElement.scrollWidth <= window.innerWidth);
    await page.evaluate(() => { document.getElementById('chat-panel').scrollIntoView(); document.activeElement && document.activeElement.blur(); });
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-threads-mobile.png') });
  }));

test('approval cards: pending, approved in two clicks, rejected, answered elsewhere, expired after a restart and live',
  { timeout: 240_000 }, () => withWorld(async (world) => {
    const { api, open, procs } = world;
    const { token: jwt, user: admin } = await api('POST', '/api/auth/login', { username: 'admin', password: 'admin123' });
    // A second admin, who answers one request in the first one's place.
    await api('POST', '/api/users', { username: 'other-admin', password: 'other-admin-1', role: 'ADMIN' }, jwt);
    const { token: otherJwt } = await api('POST', '/api/auth/login', { username: 'other-admin', password: 'other-admin-1' });
    const butlerRow = (await api('GET', '/api/users/agents', undefined, jwt)).find((u) => u.role === 'BUTLER');
    const rotated = await api('PATCH', `/api/users/agents/${butlerRow.id}/token`, {}, jwt);

    const page = await open('admin');
    await uiLogin(page, 'admin', 'admin123');
    await page.locator('#conn[data-state="live"]').waitFor();
    await page.getByRole('button', { name: 'Chat with Butler' }).click();
    await page.locator('#chat-log .chat-empty', { hasText: 'No messages with the Butler yet' }).waitFor();

    step('the Butler asks four times: cards in its (default) thread and above the panels');
    const commands = ['systemctl restart storage', 'rm -rf /var/cache/old', 'drop table sessions', 'reboot node-3'];
    const butler = startAgent(world.base, rotated.api_token, 'Butler',
      ['--auth-request-to', String(admin.id), ...commands.flatMap((c) => ['--ask', c])]);
    procs.push(butler);
    const card = (command) => page.locator('#chat-log .approval', { hasText: command });
    const listed = (command) => page.locator('#approval-list li.approval', { hasText: command });
    for (const c of commands) {
      await card(c).and(page.locator('[data-status="PENDING"]')).waitFor();
      await listed(c).and(page.locator('[data-status="PENDING"]')).waitFor();
    }
    await page.locator('#thread-list > li[data-default="true"][aria-current="true"]').waitFor();
    assert.match(await card(commands[0]).textContent(), /Butler wants to run on Storage-Custodian/);
    assert.match(await card(commands[0]).textContent(), /Reason: disk usage above 90%/);
    assert.match(await card(commands[0]).locator('.verdict').textContent(), /Waiting for your answer/);

    step('approve in the thread: the first click only arms the button');
    await card(commands[0]).getByRole('button', { name: 'Approve' }).click();
    await card(commands[0]).getByRole('button', { name: 'Confirm approve' }).waitFor();
    await listed(commands[0]).getByRole('button', { name: 'Confirm approve' }).waitFor(); // one state, two cards
    assert.equal(await card(commands[0]).getAttribute('data-status'), 'PENDING');
    await card(commands[0]).getByRole('button', { name: 'Confirm approve' }).click();
    await card(commands[0]).and(page.locator('[data-status="APPROVED"]')).locator('.verdict', { hasText: 'Approved' }).waitFor();
    await listed(commands[0]).and(page.locator('[data-status="APPROVED"]')).waitFor();
    await page.locator('#log .log-row[data-level="AUTH"]', { hasText: 'auth response received: approved' }).waitFor();
    await page.locator('#chat-log .msg.note', { hasText: 'You approved “systemctl restart storage”.' }).waitFor();

    step('reject in the list above: the thread card follows');
    await listed(commands[1]).getByRole('button', { name: 'Reject' }).click();
    await card(commands[1]).and(page.locator('[data-status="REJECTED"]')).locator('.verdict', { hasText: 'Rejected' }).waitFor();
    await page.locator('#log .log-row[data-level="AUTH"]', { hasText: 'auth response received: rejected' }).waitFor();

    step('answered elsewhere: the server refuses a second answer and the card says so');
    const third = await card(commands[2]).getAttribute('data-action-id');
    await api('POST', '/api/chat/auth/response', { action_id: third, approved: true }, otherJwt);
    assert.equal(await card(commands[2]).getAttribute('data-status'), 'PENDING', 'this page was not told');
    await card(commands[2]).getByRole('button', { name: 'Reject' }).click();
    await card(commands[2]).locator('.error', { hasText: 'The server refused: “approval already answered”.' }).waitFor();
    await card(commands[2]).and(page.locator('[data-status="APPROVED"]')).waitFor();
    await card(commands[2]).locator('.approval-why', { hasText: 'answered elsewhere' }).waitFor();

    step('after a reload the cards come from history with their status');
    await page.reload();
    await page.locator('#conn[data-state="live"]').waitFor();
    await card(commands[0]).and(page.locator('[data-status="APPROVED"]')).waitFor();
    await card(commands[1]).and(page.locator('[data-status="REJECTED"]')).waitFor();
    await card(commands[2]).and(page.locator('[data-status="APPROVED"]')).waitFor();
    await card(commands[3]).and(page.locator('[data-status="PENDING"]')).waitFor();
    // Only what still waits is listed above.
    await listed(commands[3]).waitFor();
    assert.equal(await page.locator('#approval-list li').count(), 1);

    step('a server restart expires what was pending; the page learns it when it reconnects');
    const addr = world.server.addr;
    await stop(world.server.child);
    await page.locator('#offline-banner').waitFor();
    // Back with a short approval TTL, for the live expiry below.
    world.server = await startServer(addr, world.db, ['--approval-ttl', '3s']);
    await page.locator('#conn[data-state="live"]').waitFor({ timeout: 45_000 });
    await card(commands[3]).and(page.locator('[data-status="EXPIRED"]')).locator('.verdict', { hasText: 'Expired' }).waitFor();
    await listed(commands[3]).and(page.locator('[data-status="EXPIRED"]')).waitFor();
    await card(commands[3]).locator('.approval-why', { hasText: 'Not answered in time, or the server restarted' }).waitFor();
    assert.equal(await card(commands[3]).getByRole('button', { name: 'Approve' }).count(), 0, 'nothing left to answer');
    const rows = await api('GET', `/api/chat/history/${butlerRow.id}`, undefined, jwt);
    assert.deepEqual(rows.filter((r) => r.type === 'AUTH_REQUEST').map((r) => r.payload.status), ['APPROVED', 'REJECTED', 'APPROVED', 'EXPIRED']);

    step('screenshot (a taller window: the four cards and the list above at once)');
    await page.setViewportSize({ width: 1440, height: 1200 });
    await page.evaluate(() => { document.activeElement && document.activeElement.blur(); const b = document.getElementById('chat-log'); b.scrollTop = 0; });
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-approvals.png') });

    step('a request left unanswered past --approval-ttl expires live (AUTH_STATUS_UPDATE)');
    await page.setViewportSize({ width: 1440, height: 900 });
    const rotatedAgain = await api('PATCH', `/api/users/agents/${butlerRow.id}/token`, {}, jwt);
    procs.push(startAgent(world.base, rotatedAgain.api_token, 'Butler', ['--auth-request-to', String(admin.id), '--ask', 'restart nginx']));
    await card('restart nginx').and(page.locator('[data-status="PENDING"]')).waitFor();
    await card('restart nginx').and(page.locator('[data-status="EXPIRED"]')).waitFor({ timeout: 15_000 });
    await listed('restart nginx').and(page.locator('[data-status="EXPIRED"]')).waitFor();
    assert.equal(await page.locator('#conn').getAttribute('data-state'), 'live', 'told live, not by a reconnect');
  }));
