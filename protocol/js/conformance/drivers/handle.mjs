// What a scenario holds: one client behind any driver, with its events.
export class Handle {
  constructor(backend, user) {
    this.backend = backend;
    this.user = user;
    this.events = [];
  }

  async pull() {
    this.events.push(...(await this.backend.drain()));
  }

  async call(method, args = {}) {
    const r = await this.backend.call(method, args);
    await this.pull();
    if (r.err) throw Object.assign(new Error(`${method}: ${r.err.kind} ${r.err.code ?? ""} ${r.err.message}`), { info: r.err });
    return r.ok;
  }

  subscribe(chat, o = {}) { return this.call("subscribe", { chat, ...o }); }
  unsubscribe(chat) { return this.call("unsubscribe", { chat }); }
  publish(target, text, clientMsgId) { return this.call("publish", { ...target, text, clientMsgId }); }
  receipt(target, seq, kind = "RECEIPT_KIND_READ") { return this.call("receipt", { ...target, seq, kind }); }
  typing(chat) { return this.call("typing", { chat }); }
  watchPresence(users) { return this.call("watchPresence", { users }); }
  ping() { return this.call("ping"); }
  refreshToken(token) { return this.call("refreshToken", { token }); }
  positions() { return this.call("positions"); }
  close() { return this.call("close"); }

  of(type, pred = () => true) {
    return this.events.filter((e) => e.type === type && pred(e));
  }

  /** Deliveries of a chat (or of the personal stream: `{personal: true}`). */
  deliveries(stream) {
    return this.of("delivery", (d) => (stream.personal ? !d.chat : d.chat === stream.chat));
  }

  /** Waits (polling) until `pred` holds over the events; returns its value. */
  async until(what, check, ms = 10_000) {
    const deadline = Date.now() + ms;
    for (;;) {
      await this.pull();
      const v = check(this);
      if (v) return v;
      if (Date.now() > deadline) throw new Error(`${this.user}: timed out waiting for ${what}; events: ${JSON.stringify(this.events.slice(-12))}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  waitFor(type, pred = () => true, ms) {
    return this.until(type, () => this.of(type, pred)[0], ms);
  }

  waitDeliveries(stream, n, ms) {
    return this.until(`${n} deliveries of ${JSON.stringify(stream)}`, () => {
      const d = this.deliveries(stream);
      return d.length >= n && d;
    }, ms);
  }
}
