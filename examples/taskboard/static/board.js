// The task board page: plain JS, no bundler. The centrifuge SDK (global `Centrifuge`) comes
// from /vendor/centrifuge.js, which the app serves from node_modules.
//
// How it stays right:
// * every task event carries the task's id and version; a version the page already has (or an
//   older one) is ignored, so repeats (the outbox delivers at least once) and events racing
//   the REST answers change nothing;
// * the `tasks` subscription is recoverable: after the network drops, the SDK resubscribes
//   from the last offset it saw and tidings sends what was missed (recovered: true); when that
//   is impossible (recovered: false, or the first subscribe) the page reloads the list.
'use strict';

(() => {
  const TOKEN_KEY = 'taskboard.token';
  const $ = (selector) => document.querySelector(selector);

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    me: null,
    users: [],
    tasks: new Map(), // id -> task
    versions: new Map(), // id -> newest version seen (kept after a deletion)
    online: new Map(), // client id -> user
    chatOffsets: new Set(),
    notified: new Set(), // outbox event ids already shown
    client: null,
    subs: {},
    renewTimer: null,
    lastRecovery: null, // {wasRecovering, recovered} of the last `tasks` subscribe
  };
  window.board = state; // for the curious, and for the browser test

  // -- REST ------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail) {
      super(describe(detail) || `HTTP ${status}`);
      this.status = status;
      this.detail = detail;
    }
  }

  function describe(detail) {
    if (typeof detail === 'string') return detail;
    if (Array.isArray(detail)) {
      return detail.map((e) => `${(e.loc || []).slice(1).join('.') || 'request'}: ${e.msg}`).join('; ');
    }
    if (detail && detail.message) return detail.message;
    return '';
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${state.token}` };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) {
      logout('Your session ended: please log in again.');
      throw new ApiError(401, 'not logged in');
    }
    if (!response.ok) {
      const payload = await response.json().catch(() => ({}));
      throw new ApiError(response.status, payload.detail);
    }
    return response.status === 204 ? null : response.json();
  }

  // -- login and the token ---------------------------------------------------------------------

  function tokenExpiry(token) {
    const payload = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(payload)).exp * 1000;
  }

  function setToken(token) {
    state.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    clearTimeout(state.renewTimer);
    // renew at 80% of the token's life, so neither REST calls nor the WebSocket see it expire
    const left = tokenExpiry(token) - Date.now();
    state.renewTimer = setTimeout(() => renewToken().catch(() => {}), Math.max(1000, left * 0.8));
  }

  async function renewToken() {
    const answer = await api('POST', '/token/refresh');
    setToken(answer.access_token);
    return answer.access_token;
  }

  // the SDK calls this when tidings says the connection token expired (error 109)
  async function getToken() {
    try {
      return tokenExpiry(state.token) - Date.now() > 5000 ? state.token : await renewToken();
    } catch (err) {
      throw new Centrifuge.UnauthorizedError(String(err));
    }
  }

  $('#login-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    $('#login-error').textContent = '';
    const response = await fetch('/token', {
      method: 'POST',
      body: new URLSearchParams({ username: form.get('username'), password: form.get('password') }),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      $('#login-error').textContent = describe(answer.detail) || `login failed (${response.status})`;
      return;
    }
    event.target.reset();
    setToken(answer.access_token);
    await start();
  });

  $('#logout').addEventListener('click', () => logout(''));

  function logout(message) {
    clearTimeout(state.renewTimer);
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    if (state.client) state.client.disconnect();
    state.client = null;
    state.subs = {};
    state.tasks.clear();
    state.versions.clear();
    state.online.clear();
    state.chatOffsets.clear();
    $('#tasks').replaceChildren();
    $('#chat').replaceChildren();
    $('#online').replaceChildren();
    $('#board').hidden = true;
    $('#logout').hidden = true;
    $('#me').textContent = '';
    $('#login').hidden = false;
    $('#login-error').textContent = message;
    setStatus();
  }

  // -- tasks -----------------------------------------------------------------------------------

  // Apply a task at `version` (task null: deleted) unless the page has that version already.
  function apply(id, version, task) {
    if (version <= (state.versions.get(id) || 0)) return false;
    state.versions.set(id, version);
    if (task) state.tasks.set(id, task);
    else state.tasks.delete(id);
    renderTask(id);
    return true;
  }

  async function loadTasks() {
    const tasks = await api('GET', '/tasks');
    const listed = new Set(tasks.map((t) => t.id));
    for (const task of tasks) apply(task.id, task.version, task);
    // gone from the list: deleted while the page did not hear of it
    for (const id of [...state.tasks.keys()]) {
      if (!listed.has(id)) {
        state.tasks.delete(id);
        renderTask(id);
      }
    }
  }

  async function loadUsers() {
    state.users = (await api('GET', '/users')).map((u) => u.name);
    fillAssignees($('#new-task select[name=assignee]'), null);
    for (const id of state.tasks.keys()) renderTask(id, true);
  }

  function fillAssignees(select, current) {
    const names = [...state.users];
    if (current && !names.includes(current)) names.push(current);
    const options = [new Option('(unassigned)', '')];
    for (const name of names) options.push(new Option(name === state.me ? `${name} (me)` : name, name));
    select.replaceChildren(...options);
    select.value = current || '';
  }

  function renderTask(id, force = false) {
    const list = $('#tasks');
    let item = list.querySelector(`li[data-id="${id}"]`);
    const task = state.tasks.get(id);
    if (!task) {
      if (item) item.remove();
      $('#empty').hidden = state.tasks.size > 0;
      return;
    }
    const changed = !item || Number(item.dataset.version) !== task.version;
    if (!changed && !force) return;
    const fresh = !item;
    if (fresh) {
      item = buildTask(id);
      // keep the list in id order (oldest first), as GET /tasks returns it
      const after = [...list.children].find((li) => Number(li.dataset.id) > id);
      list.insertBefore(item, after || null);
    }
    item.dataset.version = String(task.version);
    item.dataset.title = task.title;
    item.classList.toggle('done', task.done);
    item.querySelector('.done').checked = task.done;
    item.querySelector('.title').textContent = task.title;
    item.querySelector('.desc').textContent = task.description;
    item.querySelector('.desc').hidden = !task.description;
    const meta = item.querySelector('.meta');
    meta.textContent = `#${task.id} · by ${task.created_by} · v${task.version}`;
    if (task.assignee === state.me) {
      const mine = document.createElement('span');
      mine.className = 'mine';
      mine.textContent = ' · yours';
      meta.append(mine);
    }
    fillAssignees(item.querySelector('.assignee'), task.assignee);
    if (changed) { // highlight what changed (an animation, restarted for each new version)
      item.classList.remove('flash');
      void item.offsetWidth;
      item.classList.add('flash');
    }
    $('#empty').hidden = true;
  }

  function buildTask(id) {
    const item = document.createElement('li');
    item.className = 'task';
    item.dataset.id = String(id);
    const done = Object.assign(document.createElement('input'), { type: 'checkbox', className: 'done' });
    done.setAttribute('aria-label', 'done');
    const body = document.createElement('div');
    for (const [tag, cls] of [['div', 'title'], ['p', 'desc'], ['div', 'meta']]) {
      body.append(Object.assign(document.createElement(tag), { className: cls }));
    }
    const assignee = Object.assign(document.createElement('select'), { className: 'assignee' });
    assignee.setAttribute('aria-label', 'assignee');
    const remove = Object.assign(document.createElement('button'), {
      type: 'button', className: 'delete', textContent: '✕', title: 'Delete',
    });
    done.addEventListener('change', () => change(id, { done: done.checked }));
    assignee.addEventListener('change', () => change(id, { assignee: assignee.value || null }));
    remove.addEventListener('click', () => removeTask(id));
    item.append(done, body, assignee, remove);
    return item;
  }

  async function change(id, fields) {
    const task = state.tasks.get(id);
    if (!task) return;
    try {
      const updated = await api('PATCH', `/tasks/${id}`, { version: task.version, ...fields });
      apply(updated.id, updated.version, updated);
    } catch (err) {
      settle(id, err);
    }
  }

  async function removeTask(id) {
    const task = state.tasks.get(id);
    if (!task) return;
    try {
      await api('DELETE', `/tasks/${id}?version=${task.version}`);
      apply(id, task.version + 1, null);
    } catch (err) {
      settle(id, err);
    }
  }

  // A change that failed: show why, and put the task back as the server has it.
  function settle(id, err) {
    if (err.status === 409 && err.detail && err.detail.current) {
      const current = err.detail.current;
      apply(current.id, current.version, current);
      toast('Someone changed this task first: it shows their version now.', 'warn');
    } else if (err.status === 404) {
      apply(id, (state.versions.get(id) || 0) + 1, null);
      toast('That task was deleted meanwhile.', 'warn');
    } else if (err.status !== 401) {
      toast(String(err.message), 'warn');
    }
    renderTask(id, true);
  }

  $('#new-task').addEventListener('submit', async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    $('#task-error').textContent = '';
    try {
      const task = await api('POST', '/tasks', {
        title: form.get('title'),
        description: form.get('description'),
        assignee: form.get('assignee') || null,
      });
      apply(task.id, task.version, task);
      event.target.reset();
      fillAssignees($('#new-task select[name=assignee]'), null);
    } catch (err) {
      $('#task-error').textContent = err.message;
    }
  });

  // -- chat and presence -----------------------------------------------------------------------

  // What a browser published to the chat: `{text}`, or anything (nothing stops a client from
  // publishing other JSON), which is shown as JSON rather than trusted.
  function chatText(data) {
    return data && typeof data.text === 'string' ? data.text : JSON.stringify(data);
  }

  function chatLine(author, text, offset, atTop = false) {
    if (offset) {
      if (state.chatOffsets.has(offset)) return;
      state.chatOffsets.add(offset);
    }
    const line = document.createElement('li');
    if (author) {
      line.append(Object.assign(document.createElement('span'), { className: 'author', textContent: `${author}:` }));
      line.append(document.createTextNode(text));
    } else {
      line.className = 'notice';
      line.textContent = text;
    }
    const chat = $('#chat');
    if (atTop) chat.prepend(line);
    else chat.append(line);
    chat.scrollTop = chat.scrollHeight;
  }

  function renderOnline() {
    const users = [...new Set(state.online.values())].sort();
    $('#online').replaceChildren(...users.map((user) => {
      const li = document.createElement('li');
      li.textContent = user;
      if (user === state.me) li.className = 'me';
      return li;
    }));
  }

  $('#chat-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const input = event.target.elements.text;
    const text = input.value.trim();
    if (!text || !state.subs.chat) return;
    try {
      // tidings attaches the author from the connection's token: it cannot be forged here
      await state.subs.chat.publish({ text });
      input.value = '';
    } catch (err) {
      toast(`chat: ${err.message || err}`, 'warn');
    }
  });

  // -- toasts ----------------------------------------------------------------------------------

  function toast(text, kind = '') {
    const item = document.createElement('div');
    item.className = `toast ${kind}`;
    item.textContent = text;
    item.addEventListener('click', () => item.remove());
    $('#toasts').append(item);
    setTimeout(() => item.remove(), 8000);
  }

  // -- real time -------------------------------------------------------------------------------

  function setStatus() {
    const status = $('#status');
    const client = state.client;
    const tasks = state.subs.tasks;
    let label = 'offline';
    let cls = 'offline';
    if (client && client.state === 'connected' && tasks && tasks.state === 'subscribed') {
      label = 'live';
      cls = 'live';
    } else if (client && client.state !== 'disconnected') {
      label = navigator.onLine ? 'connecting…' : 'offline: waiting for the network';
      cls = 'connecting';
    }
    status.textContent = label;
    status.className = `status ${cls}`;
  }

  function connect() {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const client = new Centrifuge(`${scheme}://${location.host}/connection/websocket`, {
      token: state.token,
      getToken,
    });
    state.client = client;
    for (const name of ['connecting', 'connected', 'disconnected']) client.on(name, setStatus);
    client.on('disconnected', (ctx) => {
      if (ctx.code === 3500 || ctx.code === 3501) logout('Your session is no longer valid: please log in again.');
    });

    const tasks = client.newSubscription('tasks', { recoverable: true });
    tasks.on('subscribing', setStatus);
    tasks.on('subscribed', async (ctx) => {
      state.lastRecovery = { wasRecovering: ctx.wasRecovering, recovered: ctx.recovered };
      setStatus();
      if (!(ctx.wasRecovering && ctx.recovered)) {
        // first subscribe, or history no longer covers the gap: the list is the truth
        if (ctx.wasRecovering) toast('Could not replay what was missed while away: reloaded the board.', 'warn');
        await Promise.all([loadTasks(), loadUsers()]).catch((err) => toast(String(err.message), 'warn'));
      }
    });
    tasks.on('publication', (ctx) => apply(ctx.data.id, ctx.data.version, ctx.data.task));

    const notes = client.newSubscription(`notifications:#${state.me}`, { recoverable: true });
    notes.on('publication', (ctx) => {
      const note = ctx.data;
      if (state.notified.has(note.event)) return;
      state.notified.add(note.event);
      if (note.type === 'task.assigned') {
        toast(`${note.by} assigned you “${note.task.title}”`, 'notify');
        apply(note.task.id, note.task.version, note.task);
      }
    });

    const chat = client.newSubscription('chat:tasks', { recoverable: true, joinLeave: true });
    let chatLoaded = false;
    chat.on('subscribed', async () => {
      try {
        const presence = await chat.presence();
        state.online.clear();
        for (const [id, info] of Object.entries(presence.clients)) state.online.set(id, info.user);
        renderOnline();
        if (!chatLoaded) {
          chatLoaded = true;
          const history = await chat.history({ limit: 30, reverse: true });
          for (const pub of history.publications) {
            chatLine(pub.info ? pub.info.user : '?', chatText(pub.data), pub.offset, true);
          }
        }
      } catch (err) {
        toast(`chat: ${err.message || err}`, 'warn');
      }
    });
    chat.on('publication', (ctx) => chatLine(ctx.info ? ctx.info.user : '?', chatText(ctx.data), ctx.offset));
    chat.on('join', (ctx) => {
      const seen = [...state.online.values()].includes(ctx.info.user);
      state.online.set(ctx.info.client, ctx.info.user);
      renderOnline();
      if (!seen) chatLine(null, `${ctx.info.user} joined`);
    });
    chat.on('leave', (ctx) => {
      state.online.delete(ctx.info.client);
      renderOnline();
      if (![...state.online.values()].includes(ctx.info.user)) chatLine(null, `${ctx.info.user} left`);
    });

    state.subs = { tasks, notes, chat };
    for (const sub of Object.values(state.subs)) sub.subscribe();
    client.connect();
  }

  async function start() {
    try {
      state.me = (await api('GET', '/users/me')).name;
    } catch (err) {
      if (err.status !== 401) logout(`cannot reach the board: ${err.message}`);
      return;
    }
    $('#login').hidden = true;
    $('#board').hidden = false;
    $('#logout').hidden = false;
    $('#me').textContent = state.me;
    setToken(state.token);
    await loadUsers();
    connect();
  }

  window.addEventListener('online', setStatus);
  window.addEventListener('offline', setStatus);
  if (state.token) start();
  else logout('');
})();
