// The Rust client (switchboard_protocol::client), one agent process per
// client (edge/system/src/bin/system-client-agent.rs, $AGENT_BIN): JSON
// lines in, replies and events out. The Rust client leaves fetching a new
// token to the app; the agent reports tokenExpiring and tokenRejected, and
// this driver answers them with refresh_token, as an app would.
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";

export async function rustDriver() {
  const procs = new Set();
  return {
    name: "rust",
    caps: { seesUpgradeStatus: true },
    open: async (getToken) => {
      const child = spawn(process.env.AGENT_BIN, [], { stdio: ["pipe", "pipe", "inherit"] });
      procs.add(child);
      const waiting = new Map();
      const events = [];
      let next = 1;
      let user;
      let refresh = "never";
      const send = (op, args) => new Promise((resolve) => {
        const id = next++;
        waiting.set(id, resolve);
        child.stdin.write(JSON.stringify({ id, op, args }) + "\n");
      });
      createInterface({ input: child.stdout }).on("line", (line) => {
        const m = JSON.parse(line);
        if (m.event) {
          events.push(m.event);
          const t = m.event.type;
          if ((t === "tokenExpiring" && refresh === "always") || (t === "tokenRejected" && refresh !== "never")) {
            Promise.resolve(getToken(user, t === "tokenExpiring" ? "expiring" : "rejected")).then((token) => send("refreshToken", { token }));
          }
          return;
        }
        const w = waiting.get(m.id);
        waiting.delete(m.id);
        w?.(m);
      });
      child.on("exit", () => { for (const w of waiting.values()) w({ err: { kind: "agentExited", message: "agent exited" } }); waiting.clear(); });
      return {
        connect: (o) => { user = o.user; refresh = o.refresh ?? "never"; return send("connect", o); },
        call: (m, a) => send(m, a),
        drain: () => events.splice(0),
      };
    },
    stop: async () => { for (const p of procs) p.kill("SIGKILL"); },
  };
}
