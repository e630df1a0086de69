// The TypeScript SDK in this Node process, on the `ws` package.
import WebSocket from "ws";
import { makeAgent } from "../agent.mjs";

export async function nodeDriver() {
  return {
    name: "node",
    caps: { seesUpgradeStatus: true },
    open: async (getToken) => makeAgent(WebSocket, getToken),
    stop: async () => {},
  };
}
