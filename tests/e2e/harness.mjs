// Shared by the end-to-end tests: the server, the test agent, a browser, REST calls.

import { spawn, execFile } from 'node:child_process';
import { chromium } from 'playwright-core';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, '..', '..');
export const BIN = path.resolve(root, process.env.ECHOCENTER_BIN || 'target/debug/echocenter');
export const PYTHON = process.env.ECHOCENTER_TEST_PYTHON || path.join(root, 'target/venv/bin/python');
export const AGENT = path.join(here, 'stream_agent.py');
export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const SHOTS = path.join(root, 'target', 'e2e');
export const WAIT = 20_000;

/** Output of a child process, kept for the failure message. */
export function capture(child, name) {
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
export function startServer(addr, db, extra = []) {
  const child = spawn(BIN, ['--addr', addr, '--db', db, ...extra], {
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

export function stop(child) {
  return new Promise((resolve) => {
    if (!child || child.exitCode !== null || child.signalCode !== null) { resolve(); return; }
    child.removeAllListeners('exit');
    child.once('exit', () => resolve());
    child.kill('SIGTERM');
  });
}

export function startAgent(base, token, name, extra = []) {
  const where = base ? ['--url', base.replace(/^http/, 'ws'), '--token', token] : ['--connect', token];
  const child = spawn(PYTHON, [AGENT, ...where, '--name', name, ...extra], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  return { child, out: capture(child, name) };
}

/** Runs a shell command line exactly as a user would paste it. */
export function sh(line) {
  return new Promise((resolve, reject) => {
    execFile('bash', ['-c', line], { timeout: WAIT }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${line}\n-> ${err.message}\n${stderr}`)); else resolve(stdout);
    });
  });
}

/** The rows of the log view, as the page shows them. */
export function visibleRows(page) {
  return page.evaluate(() => [...document.querySelectorAll('#log .log-row')].filter((r) => !r.hidden).map((r) => ({
    id: Number(r.dataset.logId), level: r.dataset.level, text: r.querySelector('.text').textContent,
  })));
}

export async function apiCall(base, method, p, body, jwt) {
  const headers = {};
  if (jwt) headers.Authorization = 'Bearer ' + jwt;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(base + p, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) throw new Error(`${method} ${p} -> ${res.status} ${text}`);
  return data;
}

/** Debian's Chromium, headless, as the tests run it. */
export function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

/** A page that records JavaScript errors and anything the Content-Security-Policy blocks. */
export async function watchedPage(context, errors, name) {
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on('pageerror', (err) => errors.push(`${name}: ${err}`));
  page.on('console', (msg) => {
    if (/Content.Security.Policy/i.test(msg.text())) errors.push(`${name}: ${msg.text()}`);
  });
  page.on('dialog', (d) => d.accept());
  return page;
}

/** Logs in through the login form. */
export async function uiLogin(page, username, password) {
  const login = page.locator('#login-view');
  await login.getByLabel('Username').fill(username);
  await login.getByLabel('Password').fill(password);
  await login.getByRole('button', { name: 'Sign in' }).click();
}
