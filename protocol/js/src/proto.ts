// The protobuf subprotocol ("switchboard.v1.proto"), on the protobuf-es
// types generated from protocol/proto/switchboard/v1/switchboard.proto
// (src/gen, `npm run generate`). A separate entry point
// ("@switchboard/client/proto") so that JSON-only apps do not bundle the
// protobuf runtime.
import { create, fromBinary, fromJson, toBinary, toJson, type JsonValue } from "@bufbuild/protobuf";
import { clientFrameToJson, serverFrameFromJson } from "./codec.js";
import type { ClientFrame, Codec, ServerFrame } from "./frames.js";
import { ClientFrameSchema, ServerFrameSchema } from "./gen/switchboard/v1/switchboard_pb.js";

export { ClientFrameSchema, ServerFrameSchema };

function encode(frame: ClientFrame): Uint8Array {
  const p = frame.publish;
  if (p) {
    // The hot path: no base64 round trip for the payload.
    const target = p.chat !== undefined ? { case: "chat" as const, value: p.chat } : { case: "user" as const, value: p.user ?? "" };
    return toBinary(ClientFrameSchema, create(ClientFrameSchema, {
      id: frame.id ?? 0,
      kind: { case: "publish", value: { target, clientMsgId: p.clientMsgId, payload: p.payload } },
    }));
  }
  return toBinary(ClientFrameSchema, fromJson(ClientFrameSchema, clientFrameToJson(frame) as JsonValue));
}

function decode(data: string | ArrayBuffer | Uint8Array): ServerFrame {
  if (typeof data === "string") throw new Error("text frame on a protobuf socket");
  const msg = fromBinary(ServerFrameSchema, data instanceof Uint8Array ? data : new Uint8Array(data));
  if (msg.kind.case === "delivery") {
    const d = msg.kind.value;
    return {
      id: msg.id,
      delivery: {
        chat: d.chat, user: d.user, seq: Number(d.seq), sender: d.sender, timestampMs: Number(d.timestampMs),
        payload: d.payload, clientMsgId: d.clientMsgId, epoch: d.epoch,
      },
    };
  }
  return serverFrameFromJson(toJson(ServerFrameSchema, msg));
}

/** The protobuf subprotocol: binary frames, smaller and faster to decode than JSON. */
export const protobufCodec: Codec = { subprotocol: "switchboard.v1.proto", binary: true, encode, decode };
