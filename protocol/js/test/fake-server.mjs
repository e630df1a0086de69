// A scripted server on 127.0.0.1:0 for the client's unit tests: each test
// plays the server's side frame by frame (JSON subprotocol).
import { WebSocketServer } from "ws";
import { createServer } from "node:http";

export class FakeServer {
  static async start() {
    const s = new FakeServer();
    await new Promise((r) => s.http.listen(0, "127.0.0.1", r));
    return s;
  }

  constructor() {
    this.refusals = []; // [status, retryAfter] for the next upgrades
    this.http = createServer();
    this.wss = new WebSocketServer({ noServer: true, handleProtocols: (p) => [...p][0] });
    this.waiting = [];
    this.peers = [];
    this.upgrades = 0;
    this.http.on("upgrade", (req, socket, head) => {
      this.upgrades++;
      const refusal = this.refusals.shift();
      if (refusal) {
        const [status, retryAfter] = refusal;
        socket.end(`HTTP/1.1 ${status} Refused\r\n${retryAfter ? `Retry-After: ${retryAfter}\r\n` : ""}Content-Length: 0\r\nConnection: close\r\n\r\n`);
        return;
      }
      this.wss.handleUpgrade(req, socket, head, (ws) => {
        const peer = new Peer(ws);
        this.peers.push(peer);
        const w = this.waiting.shift();
        if (w) w(peer);
        else this.ready = [...(this.ready ?? []), peer];
      });
    });
  }

  get url() {
    return `ws://127.0.0.1:${this.http.address().port}/ws`;
  }

  /** The next socket the client opens. */
  accept(timeoutMs = 5000) {
    if (this.ready?.length) return Promise.resolve(this.ready.shift());
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error("client did not dial")), timeoutMs);
      this.waiting.push((p) => { clearTimeout(t); resolve(p); });
    });
  }

  /** Accepts and answers Connect; returns the peer and the Connect frame. */
  async session(connectResult = {}) {
    const peer = await this.accept();
    const f = await peer.next();
    peer.reply(f, { connectResult: { sessionId: "s" + this.upgrades, user: "u", heartbeatIntervalMs: 25000, userStream: { seq: "0", epoch: "pe" }, ...connectResult } });
    return { peer, connect: f };
  }

  async stop() {
    for (const p of this.peers) p.ws.terminate();
    this.wss.close();
    await new Promise((r) => this.http.close(r));
  }
}

class Peer {
  constructor(ws) {
    this.ws = ws;
    this.inbox = [];
    this.wakers = [];
    ws.on("message", (data) => {
      const f = JSON.parse(String(data));
      const w = this.wakers.shift();
      if (w) w(f);
      else this.inbox.push(f);
    });
  }

  next(timeoutMs = 5000) {
    if (this.inbox.length) return Promise.resolve(this.inbox.shift());
    return new Promise((resolve, reject) => {
      const waker = (f) => { clearTimeout(t); resolve(f); };
      const t = setTimeout(() => {
        this.wakers.splice(this.wakers.indexOf(waker), 1);
        reject(new Error("no frame from the client"));
      }, timeoutMs);
      this.wakers.push(waker);
    });
  }

  send(f) {
    this.ws.send(JSON.stringify(f));
  }

  reply(req, body) {
    this.send({ id: req.id, ...body });
  }
}

/** Resolves with the first event `name` that matches. */
export function once(client, name, pred = () => true, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => { off(); reject(new Error(`no ${name} event`)); }, timeoutMs);
    const off = client.on(name, (v) => {
      if (pred(v)) { clearTimeout(t); off(); resolve(v); }
    });
  });
}
