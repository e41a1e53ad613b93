// vllm-apollo console: chat with the served model, teach it from the chat, watch it learn.
// Plain script, no dependencies. Live state comes from one server-sent-event stream
// (/console/events, a snapshot a second); every action uses the server's ordinary endpoints.
"use strict";
(() => {
  const KEY = "vllm-apollo-key";
  const MAX_TOKENS = 128;
  const WIDE = window.matchMedia("(min-width: 1000px)");
  const $ = (sel, root = document) => root.querySelector(sel);
  const state = {
    key: sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "",
    snap: null, points: [], versions: null, view: "chat",
    convo: [],            // {role, content} sent with each question
    lessons: new Map(),   // example id -> lesson
    busy: false, stream: null, ready: false,
  };

  // --- small helpers ---------------------------------------------------------------
  function el(tag, attrs = {}, ...kids) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    node.append(...kids.filter((k) => k !== null && k !== undefined));
    return node;
  }
  const svgEl = (tag, attrs = {}) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  };
  const num = (x, digits = 4) => (x === null || x === undefined ? "–" :
    Math.abs(x) >= 1e4 || (x !== 0 && Math.abs(x) < 1e-3) ? x.toExponential(2) :
    String(Number(x.toPrecision(digits))));
  const ms = (s) => (s === null || s === undefined ? "–" : s >= 10 ? `${s.toFixed(1)} s` :
    `${(s * 1000).toFixed(0)} ms`);
  const secs = (s) => (s === null || s === undefined ? "–" : `${s.toFixed(2)} s`);
  const bytes = (b) => (b === null || b === undefined ? "–" : b < 1024 ? `${b} B` :
    b < 1 << 20 ? `${(b / 1024).toFixed(1)} KiB` : b < 1 << 30 ?
    `${(b / 2 ** 20).toFixed(1)} MiB` : `${(b / 2 ** 30).toFixed(2)} GiB`);
  const when = (t) => (t ? new Date(t * 1000).toLocaleString(undefined,
    { dateStyle: "short", timeStyle: "short" }) : "–");
  const short = (id) => (id || "").replace(/^ftjob-/, "").slice(0, 8);

  function authHeaders(extra = {}) {
    return state.key ? { ...extra, authorization: `Bearer ${state.key}` } : extra;
  }

  async function api(path, method = "GET", body = undefined) {
    let r;
    try {
      r = await fetch(path, {
        method, body: body === undefined ? undefined : JSON.stringify(body),
        headers: authHeaders(body === undefined ? {} : { "content-type": "application/json" }),
      });
    } catch (err) {
      return { ok: false, status: 0, data: null, why: `the server did not answer (${err.message})` };
    }
    let data = null;
    try { data = await r.json(); } catch { /* not JSON */ }
    return { ok: r.ok, status: r.status, data, why: r.ok ? "" : explain(r.status, data) };
  }

  function explain(status, data) {
    if (status === 401) {
      keyNeeded();
      return state.key ? "refused (401): the API key is wrong; enter it again with the “API key” button"
        : "refused (401): this server requires the API key; enter it with the “API key” button";
    }
    let detail = data && (data.detail ?? (data.error && data.error.message));
    if (Array.isArray(detail)) detail = detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    return `${status}: ${detail || "request failed"}`;
  }

  let noticeTimer = null;
  function notice(text, kind = "error") {
    const box = $("#notice");
    box.textContent = text;
    box.className = kind;
    box.hidden = false;
    clearTimeout(noticeTimer);
    if (kind === "info") noticeTimer = setTimeout(() => { box.hidden = true; }, 8000);
  }

  // --- views (tabs) ----------------------------------------------------------------
  const tabs = () => [...document.querySelectorAll("[role=tab]")]
    .filter((t) => t.offsetParent !== null);

  function select(view, focus = false) {
    if (WIDE.matches && view === "chat") view = state.view !== "chat" ? state.view : "training";
    state.view = view;
    for (const tab of document.querySelectorAll("[role=tab]")) {
      const on = tab.dataset.view === view;
      tab.setAttribute("aria-selected", String(on));
      tab.tabIndex = on ? 0 : -1;
      if (on && focus) tab.focus();
      $(`#${tab.dataset.view}`).hidden = !on;
    }
    render();
  }

  function onTabKey(event) {
    const list = tabs();
    const i = list.indexOf(event.target);
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: list.length - 1 }[event.key];
    if (next === undefined || i < 0) return;
    event.preventDefault();
    select(list[(next + list.length) % list.length].dataset.view, true);
  }

  // --- the key ---------------------------------------------------------------------
  function keyNeeded() { $("#key-button").className = "pill needed"; }

  function showKeyState() {
    const auth = state.snap && state.snap.auth;
    const button = $("#key-button");
    if (!auth) return;
    if (!auth.required) {
      button.textContent = "no key needed";
      button.className = "pill";
    } else if (auth.ok) {
      button.textContent = "API key ✓";
      button.className = "pill set";
    } else {
      button.textContent = state.key ? "API key refused" : "API key needed";
      button.className = "pill needed";
    }
  }

  function onKeyClose() {
    const dialog = $("#key-dialog");
    const input = $("#key-input");
    if (dialog.returnValue === "save" && input.value.trim()) {
      state.key = input.value.trim();
      sessionStorage.setItem(KEY, state.key);
      if ($("#key-remember").checked) localStorage.setItem(KEY, state.key);
      else localStorage.removeItem(KEY);
      notice("API key saved for this tab.", "info");
    } else if (dialog.returnValue === "forget") {
      state.key = "";
      sessionStorage.removeItem(KEY);
      localStorage.removeItem(KEY);
      notice("API key forgotten.", "info");
    }
    input.value = "";
    connect();
    $("#key-button").focus();
  }

  // --- chat ------------------------------------------------------------------------
  async function streamChat(messages, onText) {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: authHeaders({ "content-type": "application/json" }),
      body: JSON.stringify({ messages, stream: true, temperature: 0, max_tokens: MAX_TOKENS }),
    });
    if (!r.ok) {
      let data = null;
      try { data = await r.json(); } catch { /* not JSON */ }
      throw new Error(explain(r.status, data));
    }
    let version = r.headers.get("x-apollo-weight-version");
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut).replace(/\r$/, "");
        buffer = buffer.slice(cut + 1);
        if (line.startsWith(": x-apollo-weight-version:")) {
          version = line.split(":").slice(2).join(":").trim();  // the whole stream's range
        } else if (line.startsWith("data: ") && line !== "data: [DONE]") {
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
          const text = chunk.choices && chunk.choices[0] && chunk.choices[0].delta &&
            chunk.choices[0].delta.content;
          if (text) onText(text);
        }
      }
    }
    return version;
  }

  function bubble(role, text) {
    const item = el("li", { class: `msg ${role}` },
      el("div", { class: "who" }, el("span", { text: role === "user" ? "You" : "Model" })),
      el("div", { class: "text", text }));
    return item;
  }

  function scrollChat() {
    const list = $("#messages");
    if (WIDE.matches) list.scrollTop = list.scrollHeight;
    else list.lastElementChild?.scrollIntoView({ block: "nearest" });
  }

  // An answer: its context (the messages before it, ending with the question), its text,
  // the weights that produced it, its buttons and the lessons taught from it.
  async function answer(context, index, after = null, note = "") {
    const turn = { context, index, text: "", version: null, lessons: [] };
    turn.item = bubble("assistant", "");
    turn.item.dataset.role = "answer";
    turn.item.classList.add("streaming");
    turn.who = $(".who", turn.item);
    if (note) turn.who.append(el("span", { text: note }));
    turn.textEl = $(".text", turn.item);
    if (after) after.after(turn.item); else $("#messages").append(turn.item);
    scrollChat();
    setBusy(true);
    try {
      turn.version = await streamChat(context, (t) => {
        turn.text += t;
        turn.textEl.textContent = turn.text;
        scrollChat();
      });
      if (turn.version) {
        turn.who.append(el("span", { class: "ver", text: `weights v${turn.version}` }));
      }
      state.convo[index] = { role: "assistant", content: turn.text };
      turn.item.append(actions(turn));
      turn.item.dataset.done = "true";
    } catch (err) {
      turn.textEl.textContent = turn.text || "(no answer)";
      turn.item.append(el("p", { class: "lesson", "data-state": "failed", text: err.message }));
      turn.item.dataset.done = "error";
    } finally {
      turn.item.classList.remove("streaming");
      setBusy(false);
    }
    return turn;
  }

  function setBusy(busy) {
    state.busy = busy;
    $("#send").disabled = busy;
  }

  function actions(turn) {
    const form = el("form", { class: "correction", hidden: true });
    const area = el("textarea", { rows: 2, required: true, "aria-label": "The answer it should have given" });
    const pair = el("input", { type: "checkbox" });
    form.append(
      el("label", { text: "This should have been:" }), area,
      el("label", { class: "check" }, pair,
        el("span", { text: "also mark the served answer as worse (a preference pair, DPO)" })),
      el("div", { class: "row" },
        el("button", { type: "submit", class: "primary", text: "Teach" }),
        el("button", { type: "button", text: "Cancel", onclick: () => { form.hidden = true; } })));
    area.value = turn.text;
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const wanted = area.value.trim();
      if (!wanted) return;
      form.hidden = true;
      teach(turn, pair.checked ? "pair" : "demo", wanted);
    });
    area.addEventListener("keydown", (e) => {
      if (e.key === "Escape") { form.hidden = true; open.focus(); }
    });
    const open = el("button", {
      type: "button", class: "correct", text: "This should have been…",
      onclick: () => { form.hidden = false; area.focus(); area.select(); },
    });
    const box = el("div", {},
      el("div", { class: "actions" }, open,
        el("button", { type: "button", class: "better", text: "Better", title: "a thumbs-up on this answer (KTO)", onclick: () => teach(turn, "up") }),
        el("button", { type: "button", class: "worse", text: "Worse", title: "a thumbs-down on this answer (KTO)", onclick: () => teach(turn, "down") })),
      form, el("ol", { class: "lessons" }));
    turn.lessonList = $(".lessons", box);
    return box;
  }

  const plain = (messages) => messages.map((m) => ({ role: m.role, content: m.content }));
  const KIND = { demo: "demonstration", pair: "preference pair", up: "thumbs-up", down: "thumbs-down" };

  async function teach(turn, kind, wanted = "") {
    let example;
    if (kind === "demo") {  // earlier answers are context, not targets: weight 0
      example = { messages: [...turn.context.map((m) => (m.role === "assistant" ?
        { ...m, weight: 0 } : { ...m })), { role: "assistant", content: wanted }] };
    } else if (kind === "pair") {
      example = { prompt: plain(turn.context), completion: turn.text, label: false,
        preferred_completion: wanted };
    } else {
      example = { prompt: plain(turn.context), completion: turn.text, label: kind === "up" };
    }
    const lesson = { turn, kind, wanted, id: null, state: "sending", step: null, reason: "",
      served: null, asked: false };
    lesson.item = el("li", { class: "lesson" });
    turn.lessonList.append(lesson.item);
    showLesson(lesson);
    const res = await api("/train", "POST", example);
    if (!res.ok) {
      lesson.state = "refused";
      lesson.reason = res.why;
      showLesson(lesson);
      notice(`Lesson not taken: ${res.why}`);
      return;
    }
    lesson.id = res.data.ids[0];
    lesson.state = "queued";
    state.lessons.set(lesson.id, lesson);
    showLesson(lesson);
    connect();  // watch it
  }

  function showLesson(lesson) {
    const shown = lesson.state === "trained" && lesson.served ? "served" : lesson.state;
    const item = lesson.item;
    item.dataset.state = shown;
    if (lesson.id) item.dataset.id = lesson.id;
    const what = `${KIND[lesson.kind]}${lesson.wanted ? ` “${lesson.wanted}”` : ""}`;
    let text = `Lesson (${what}): `;
    if (shown === "sending") text += "sending…";
    else if (shown === "refused") text += lesson.reason;
    else if (shown === "queued") text += "queued";
    else if (shown === "trained" || shown === "served") {
      text += `trained at step ${lesson.step}${lesson.reason ? ` (${lesson.reason})` : ""}`;
      text += shown === "served" ? ` → served: weights v${lesson.served} answered below`
        : " → asking again…";
    } else text += `${shown}${lesson.reason ? `: ${lesson.reason}` : ""}`;
    item.textContent = text;
  }

  function follow(watched) {
    for (const [id, ex] of Object.entries(watched || {})) {
      const lesson = state.lessons.get(id);
      if (!lesson) continue;
      const changed = lesson.state !== ex.state || lesson.reason !== (ex.reason || "");
      lesson.state = ex.state;
      lesson.step = ex.step;
      lesson.reason = ex.reason || "";
      if (changed) showLesson(lesson);
      if (ex.state === "trained" && !lesson.asked) {
        lesson.asked = true;
        askAgain(lesson);
      }
    }
  }

  async function askAgain(lesson) {
    const old = lesson.turn;
    while (state.busy) await new Promise((r) => setTimeout(r, 200));
    const turn = await answer(old.context, old.index, old.item, "asked again after the lesson");
    if (turn.item.dataset.done !== "true") return;
    old.item.classList.add("superseded");
    turn.item.dataset.lesson = lesson.id;
    lesson.served = turn.version || "?";
    showLesson(lesson);
  }

  async function onAsk(event) {
    event.preventDefault();
    const box = $("#prompt");
    const text = box.value.trim();
    if (!text || state.busy) return;
    box.value = "";
    state.convo.push({ role: "user", content: text });
    $("#messages").append(bubble("user", text));
    await answer(state.convo.slice(), state.convo.length);
    box.focus();
  }

  // --- the live stream -------------------------------------------------------------
  function connect() {
    if (state.stream) state.stream.abort();
    const ctl = new AbortController();
    state.stream = ctl;
    const watch = [...state.lessons.keys()].slice(-64).join(",");  // the newest lessons
    const url = `/console/events${watch ? `?watch=${encodeURIComponent(watch)}` : ""}`;
    let first = true;
    (async () => {
      try {
        const r = await fetch(url, { headers: authHeaders(), signal: ctl.signal });
        if (!r.ok) throw new Error(`${r.status}`);
        const conn = $("#conn");
        conn.textContent = "live";
        conn.className = "pill live";
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            const data = block.split("\n").filter((l) => l.startsWith("data: "))
              .map((l) => l.slice(6)).join("\n");
            if (data) { onSnapshot(JSON.parse(data), first); first = false; }
          }
        }
      } catch (err) {
        if (ctl.signal.aborted) return;
      }
      if (ctl.signal.aborted) return;
      const conn = $("#conn");
      conn.textContent = "reconnecting…";
      conn.className = "pill down";
      setTimeout(() => { if (state.stream === ctl) connect(); }, 2000);
    })();
  }

  function onSnapshot(snap, first) {
    state.snap = snap;
    state.points = first ? snap.points : state.points.concat(snap.points);
    if (state.points.length > 4000) state.points = state.points.slice(-4000);
    if (snap.versions) state.versions = snap.versions;
    follow(snap.watched);
    render();
    if (!state.ready) {
      state.ready = true;
      document.documentElement.dataset.ready = String(Math.round(performance.now()));
    }
  }

  // --- rendering -------------------------------------------------------------------
  function render() {
    const snap = state.snap;
    if (!snap) return;
    const s = snap.status;
    $("#model").textContent = snap.model;
    $("#weights").textContent = `weights v${s.weight_version}` +
      (s.weight_checkpoint !== null ? ` = checkpoint ${s.weight_checkpoint}` : "");
    $("#chat-hint").hidden = state.convo.length > 0;
    $("#send").title = snap.chat ? "" : "this server has no vLLM to forward chats to";
    showKeyState();
    const visible = (id) => !$(`#${id}`).hidden;
    if (visible("training")) renderTraining(s);
    if (visible("examples")) renderExamples(snap);
    if (visible("versions")) renderVersions();
  }

  function renderTraining(s) {
    const cards = [
      ["Optimizer steps", s.optimizer_steps],
      ["Last loss", num(s.last_loss)],
      ["Queued", s.examples_queued],
      ["Trained / failed", `${s.examples_trained} / ${s.examples_failed}`],
      ["Step time", ms(s.last_step_seconds)],
      ["Write time", ms(s.last_write_seconds)],
      ["Serving stall (total)", secs(s.serving_stall_seconds)],
      ["vLLM waited (total)", secs(s.vllm_waited_seconds)],
      ["Skipped steps", s.skipped_steps],
      ["Weight version", s.weight_version + (s.weight_checkpoint !== null ?
        ` (= checkpoint ${s.weight_checkpoint})` : "")],
      ["Drift (mean KL)", s.drift ? num(s.drift.mean_kl) : "–"],
      ["Drift budget", s.drift_budget ? num(s.drift_budget) : "none"],
      ["Undone batches", s.undone_batches],
      ["Learned without a step", s.learned_without_steps],
      ["Last checkpoint", s.last_checkpoint ?
        `v${s.last_checkpoint.version ?? "–"} at step ${s.last_checkpoint.optimizer_step}` :
        s.checkpointing_disabled ? "disabled" : "none"],
    ];
    $("#stats").replaceChildren(...cards.map(([k, v]) =>
      el("div", {}, el("dt", { text: k }), el("dd", { text: String(v) }))));
    const loss = state.points.filter((p) => p.loss !== null).map((p) => ({ x: p.step, y: p.loss }));
    const drift = state.points.filter((p) => p.drift !== null).map((p) => ({ x: p.step, y: p.drift }));
    chart($("#loss-chart"), loss, "loss", true);
    chart($("#drift-chart"), drift, "drift", false);
  }

  function chart(svg, pts, name, log) {
    svg.classList.toggle("drift", name === "drift");
    const W = Math.max(svg.clientWidth, 200);
    const H = Math.max(svg.clientHeight, 120);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.dataset.points = String(pts.length);
    svg.replaceChildren();
    const L = 52, R = 10, T = 10, B = 22;
    if (!pts.length) {
      const t = svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" });
      t.textContent = "no points yet";
      svg.append(t);
      return;
    }
    const fy = (y) => (log ? Math.log10(Math.max(y, 1e-12)) : y);
    let [x0, x1] = [Math.min(...pts.map((p) => p.x)), Math.max(...pts.map((p) => p.x))];
    let [y0, y1] = [Math.min(...pts.map((p) => fy(p.y))), Math.max(...pts.map((p) => fy(p.y)))];
    if (!log) y0 = Math.min(y0, 0);
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { y0 -= log ? 0.5 : Math.abs(y0) * 0.1 + 1e-9; y1 += log ? 0.5 : Math.abs(y1) * 0.1 + 1e-9; }
    const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const sy = (y) => T + (1 - (fy(y) - y0) / (y1 - y0)) * (H - T - B);
    const label = (x, y, text, anchor) => {
      const t = svgEl("text", { x, y, "text-anchor": anchor });
      t.textContent = text;
      svg.append(t);
    };
    svg.append(svgEl("path", { class: "axis", d: `M${L},${T}V${H - B}H${W - R}` }));
    const yv = (v) => num(log ? 10 ** v : v, 2);
    label(L - 4, T + 4, yv(y1), "end");
    label(L - 4, H - B, yv(y0), "end");
    label(L, H - 6, `step ${x0 < 0 ? 0 : Math.round(x0)}`, "start");
    label(W - R, H - 6, `step ${Math.round(x1)}`, "end");
    svg.append(svgEl("polyline", { class: "line",
      points: pts.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ") }));
    if (pts.length <= 400) {
      for (const p of pts) {
        const c = svgEl("circle", { class: "pt", cx: sx(p.x).toFixed(1), cy: sy(p.y).toFixed(1), r: 2.5 });
        const tip = svgEl("title");
        tip.textContent = `step ${p.x}: ${name} ${num(p.y)}`;
        c.append(tip);
        svg.append(c);
      }
    }
  }

  // Redraw `box` with `draw` only when `data` changed since its last drawing; a focused button
  // (a keyboard user's place) is focused again in the new drawing.
  const drawn = new WeakMap();
  function redraw(box, data, draw) {
    const key = JSON.stringify(data);
    if (drawn.get(box) === key) return;
    drawn.set(box, key);
    const active = document.activeElement;
    const row = box.contains(active) ? active.closest("[data-id], [data-n]") : null;
    const which = row && (row.dataset.id ? `[data-id="${row.dataset.id}"]` : `[data-n="${row.dataset.n}"]`);
    const cls = row && active.className.split(" ")[0];
    draw();
    if (which) {
      const again = box.querySelector(`${which} ${active.tagName.toLowerCase()}${cls ? `.${cls}` : ""}`);
      if (again && !again.disabled) again.focus();
    }
  }

  function needKey(what) {
    return el("p", { class: "muted", text: `Enter the API key (button above) to see ${what}.` });
  }

  function renderExamples(snap) {
    redraw($("#examples"), [snap.jobs, snap.examples, snap.auth], () => drawExamples(snap));
  }

  function drawExamples(snap) {
    const jobs = $("#jobs");
    if (snap.jobs === null) {
      jobs.replaceChildren(snap.auth.ok ? el("p", { class: "muted", text: "This server runs no fine-tuning jobs." }) : needKey("fine-tuning jobs"));
    } else if (!snap.jobs.length) {
      jobs.replaceChildren(el("p", { class: "muted", text: "No fine-tuning jobs yet (the OpenAI fine-tuning API or python -m server.client: docs/fine-tuning.md)." }));
    } else {
      jobs.replaceChildren(...snap.jobs.map(jobCard));
    }
    const body = $("#example-table tbody");
    if (snap.examples === null) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 5 }, needKey("examples"))));
      return;
    }
    if (!snap.examples.length) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "muted", text: "No examples yet." })));
      return;
    }
    body.replaceChildren(...snap.examples.map((ex) => el("tr", { "data-id": ex.id },
      el("td", { class: "id", title: ex.id, text: short(ex.id) }),
      el("td", { text: (ex.kind || "–") + (ex.group ? ` (job ${short(ex.group)})` : "") }),
      el("td", { class: `state-${ex.state.split(" ")[0]}`, text: ex.state }),
      el("td", { text: ex.step ?? "–" }),
      el("td", { class: "reason", text: ex.reason || "" }))));
  }

  function jobCard(job) {
    const running = ["queued", "validating_files", "running"].includes(job.status);
    const total = job.total || 0;
    const bar = el("progress", { max: Math.max(total, 1), value: job.done,
      "aria-label": `job ${job.id} progress` });
    return el("div", { class: "job", "data-id": job.id },
      el("div", { class: "row" }, el("span", { class: "id", text: job.id }),
        el("span", { text: `${job.method} · ${job.status}` })),
      bar,
      el("div", { class: "row muted" },
        el("span", { text: total ? `${job.done} of ${total} example-epochs` : "validating the file…" }),
        job.error ? el("span", { class: "state-failed", text: job.error }) : null,
        running ? el("button", { type: "button", text: "Cancel job", onclick: () => cancelJob(job.id) }) : null));
  }

  async function cancelJob(id) {
    const res = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/cancel`, "POST");
    notice(res.ok ? `Job ${id}: ${res.data.status}.` : `Cancel refused: ${res.why}`, res.ok ? "info" : "error");
  }

  function renderVersions() {
    redraw($("#versions"), state.versions, drawVersions);
  }

  function drawVersions() {
    const v = state.versions;
    const note = $("#versions-note");
    const body = $("#version-table tbody");
    const enabled = v && !v.disabled && !v.error;
    $("#checkpoint").disabled = !enabled;
    $("#rollback-last").disabled = !enabled;
    if (!v) return;
    if (!enabled) {
      note.textContent = v.disabled || `The versions could not be read: ${v.error}`;
      body.replaceChildren();
      return;
    }
    note.textContent = `The model's files hold version ${v.head}; the live weights are ` +
      `v${v.weight_version}${v.weight_checkpoint !== null ? ` (= checkpoint ${v.weight_checkpoint})` :
      " (changed since the last checkpoint)"}. History: ${bytes(v.history_bytes)}` +
      `${v.history ? "" : " (off: rollback only to the last checkpoint)"}.`;
    body.replaceChildren(...[...v.versions].reverse().map((ver) => {
      const live = v.weight_checkpoint === ver.n;
      const button = el("button", { type: "button", class: "rollback", "data-n": ver.n,
        text: live ? "live now" : "Roll back",
        "aria-label": live ? `version ${ver.n} is live` : `Roll back to version ${ver.n}`, disabled: live || !ver.reachable,
        title: ver.reachable ? "" : "its bytes are no longer kept",
        onclick: () => rollback(ver.n, `version ${ver.n}${ver.name ? ` (${ver.name})` : ""}`) });
      return el("tr", { "data-n": ver.n },
        el("td", {}, el("div", { text: `v${ver.n}${ver.name ? ` ${ver.name}` : ""}` }), button),
        el("td", { text: when(ver.time) }),
        el("td", { text: ver.examples ?? "–" }),
        el("td", { text: ver.optimizer_steps ?? "–" }),
        el("td", { text: ver.drift ? num(ver.drift.mean_kl) : "–" }),
        el("td", { text: bytes(ver.bytes_changed) }));
    }));
  }

  function confirmAction(text) {
    const dialog = $("#confirm-dialog");
    $("#confirm-text").textContent = text;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }

  async function rollback(to, label) {
    const ok = await confirmAction(`Roll the live weights back to ${label}? ` +
      "Examples trained since then are marked “rolled back”; serving pauses for the writes.");
    if (!ok) return;
    const res = await api("/rollback", "POST", { to });
    if (res.ok) {
      notice(`Rolled back to version ${res.data.version}: ${res.data.examples_rolled_back} ` +
        `examples rolled back, serving stalled ${secs(res.data.stall_seconds)}.`, "info");
    } else notice(`Rollback refused: ${res.why}`);
  }

  async function checkpoint() {
    const button = $("#checkpoint");
    button.disabled = true;
    notice("Writing a checkpoint…", "progress");
    const res = await api("/checkpoint", "POST");
    button.disabled = false;
    if (!res.ok) { notice(`Checkpoint refused: ${res.why}`); return; }
    const c = res.data;
    notice(c.version === null ? "Checkpoint: nothing had changed since the last one." :
      `Checkpoint v${c.version}: ${bytes(c.bytes_changed)} changed, written in ${secs(c.seconds)}.`,
      "info");
  }

  // --- start -----------------------------------------------------------------------
  function start() {
    for (const tab of document.querySelectorAll("[role=tab]")) {
      tab.addEventListener("click", () => select(tab.dataset.view));
      tab.addEventListener("keydown", onTabKey);
    }
    WIDE.addEventListener("change", () => select(state.view));
    window.addEventListener("resize", () => render());
    $("#ask").addEventListener("submit", onAsk);
    $("#prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("#ask").requestSubmit();
      }
    });
    $("#new-chat").addEventListener("click", () => {
      state.convo = [];
      $("#messages").replaceChildren();
      render();
      $("#prompt").focus();
    });
    $("#key-button").addEventListener("click", () => {
      $("#key-remember").checked = !!localStorage.getItem(KEY);
      $("#key-dialog").returnValue = "";  // Esc keeps the last value: not a "save"
      $("#key-dialog").showModal();
    });
    $("#key-dialog").addEventListener("close", onKeyClose);
    $("#checkpoint").addEventListener("click", checkpoint);
    $("#rollback-last").addEventListener("click", () => rollback("last-checkpoint", "the last checkpoint"));
    $("#notice").addEventListener("click", () => { $("#notice").hidden = true; });
    select(WIDE.matches ? "training" : "chat");
    connect();
  }

  start();
})();
