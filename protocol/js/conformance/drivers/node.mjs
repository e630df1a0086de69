// The TypeScript SDK in this Node process, on the `ws` package.
import { readFileSync } from "node:fs";
import WebSocket from "ws";
import { makeAgent } from "../agent.mjs";

export async function nodeDriver() {
  return {
    name: "node",
    caps: { seesUpgradeStatus: true },
    open: async (getToken) => makeAgent(WebSocket, getToken, (WS, caFile) => {
      const ca = readFileSync(caFile);
      return class extends WS {
        constructor(url, protocols) {
          super(url, protocols, { ca });
        }
      };
    }),
    stop: async () => {},
  };
}
