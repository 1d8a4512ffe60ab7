export { Client, Room } from "./client.js";
export type { ChangeInfo, ClientEvents, ClientOptions, RoomEvents, RoomOptions, SendOptions, Status } from "./client.js";
export { ClientClosedError, ConnectionError, KasagiError, RelayError } from "./errors.js";
export { backoffDelay, RECONNECT_CODES } from "./backoff.js";
export { applyDelta, applyMerge, applyPatch, jsonEqual, MAX_DEPTH, PatchError } from "./patch.js";
export type { Delta, Json, JsonObject, Operation } from "./patch.js";
export { parse, ProtocolError, RoomStream, SUBPROTOCOLS } from "./protocol.js";
export type { Format, Member, Reply, Step } from "./protocol.js";
export type { SocketConstructor } from "./socket.js";
