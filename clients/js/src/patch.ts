/**
 * RFC 6902 (JSON Patch) and RFC 7396 (JSON Merge Patch) on plain JSON values.
 *
 * Written here rather than taken from npm, for three reasons:
 * - the relay's engine has rules the RFCs leave open (docs/protocol.md, "Deltas"): a patch is
 *   atomic, `-` is allowed as a move/copy target, removing the root fails, an operation that
 *   would nest the state deeper than 128 levels fails. A failed delta must be a no-op here
 *   exactly as on the relay, so these rules have to be the engine's;
 * - `fast-json-patch`, the common choice, refuses `__proto__` members (the relay treats them as
 *   ordinary keys) and mutates or deep-clones the document, while a UI wants a new object per
 *   change with the untouched parts shared;
 * - the whole apply is about 200 lines; the repository's conformance data
 *   (tests/data/rfc6902-spec-tests.json) runs against it in the tests.
 *
 * Updates are copy-on-write: every container on a changed path is copied once per apply and
 * the rest of the document is shared with the previous state, so the previous state is
 * never modified and a failed patch is discarded whole. Cost: the delta's size plus the
 * containers it touches, never the whole document.
 */

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

export type Operation =
  | { op: "add" | "replace" | "test"; path: string; value: Json }
  | { op: "remove"; path: string }
  | { op: "move" | "copy"; from: string; path: string };

/** docs/protocol.md: documents and deltas nest at most 128 levels. */
export const MAX_DEPTH = 128;

/** A patch that does not apply (or is malformed); the document is unchanged. */
export class PatchError extends Error {
  override name = "PatchError";
}

const hasOwn = (obj: object, key: string): boolean => Object.prototype.hasOwnProperty.call(obj, key);

export function isObject(value: unknown): value is JsonObject {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Sets an own member; `obj[key] = v` would set the prototype for the key "__proto__". */
function setMember(obj: JsonObject, key: string, value: Json): void {
  if (key === "__proto__") {
    Object.defineProperty(obj, key, { value, writable: true, enumerable: true, configurable: true });
  } else {
    obj[key] = value;
  }
}

function member(obj: JsonObject, key: string): Json | undefined {
  return hasOwn(obj, key) ? obj[key] : undefined;
}

/** RFC 6901: "" is the root, otherwise "/"-separated tokens with ~1 for "/" and ~0 for "~". */
export function parsePointer(pointer: string): string[] {
  if (pointer === "") return [];
  if (!pointer.startsWith("/")) throw new PatchError(`bad pointer ${JSON.stringify(pointer)}`);
  return pointer
    .slice(1)
    .split("/")
    .map((token) => {
      if (/~(?![01])/.test(token)) throw new PatchError(`bad pointer ${JSON.stringify(pointer)}`);
      return token.replace(/~1/g, "/").replace(/~0/g, "~");
    });
}

const INDEX = /^(0|[1-9][0-9]*)$/;

function arrayIndex(arr: Json[], token: string, forInsert: boolean): number {
  if (forInsert && token === "-") return arr.length;
  if (!INDEX.test(token)) throw new PatchError(`bad array index ${JSON.stringify(token)}`);
  const index = Number(token);
  if (index > arr.length || (!forInsert && index === arr.length)) {
    throw new PatchError(`array index ${token} out of range`);
  }
  return index;
}

/** JSON equality: numbers by value, objects regardless of member order. */
export function jsonEqual(a: Json, b: Json): boolean {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Array.isArray(a)) {
    if (!Array.isArray(b) || a.length !== b.length) return false;
    return a.every((item, i) => jsonEqual(item, b[i] as Json));
  }
  if (Array.isArray(b)) return false;
  const keys = Object.keys(a);
  if (keys.length !== Object.keys(b).length) return false;
  return keys.every((key) => hasOwn(b, key) && jsonEqual(a[key] as Json, b[key] as Json));
}

/** Nesting depth (a scalar 0, a container 1 + its deepest child), counted up to `limit` + 1. */
function depth(value: Json, limit: number): number {
  if (typeof value !== "object" || value === null) return 0;
  if (limit <= 0) return 1;
  let deepest = 0;
  for (const child of Array.isArray(value) ? value : Object.values(value)) {
    deepest = Math.max(deepest, depth(child, limit - 1));
    if (deepest >= limit) break;
  }
  return 1 + deepest;
}

function get(doc: Json, tokens: readonly string[], pointer: string): Json {
  let node = doc;
  for (const token of tokens) {
    if (Array.isArray(node)) {
      node = node[arrayIndex(node, token, false)] as Json;
    } else if (isObject(node) && hasOwn(node, token)) {
      node = node[token] as Json;
    } else {
      throw new PatchError(`path ${pointer} not found`);
    }
  }
  return node;
}

/** One apply's copy-on-write bookkeeping: the containers it made, which it may change. */
class Writer {
  private fresh = new WeakSet();

  writable<T extends Json[] | JsonObject>(node: T): T {
    if (this.fresh.has(node)) return node;
    // Spread, unlike Object.assign, copies a "__proto__" member as a member. (The rule below
    // cannot see that `node` is an object in this branch.)
    // eslint-disable-next-line @typescript-eslint/no-misused-spread
    const copy = (Array.isArray(node) ? node.slice() : { ...node }) as T;
    this.fresh.add(copy);
    return copy;
  }

  /** After a copy one value is reachable twice: nothing made so far may change in place. */
  forget(): void {
    this.fresh = new WeakSet();
  }

  /** The document with `change` applied to the (copied) parent of the last token. */
  update(
    node: Json,
    tokens: readonly string[],
    i: number,
    pointer: string,
    change: (parent: Json[] | JsonObject, token: string) => void,
  ): Json {
    const token = tokens[i] as string;
    if (typeof node !== "object" || node === null) throw new PatchError(`path ${pointer} not found`);
    if (i === tokens.length - 1) {
      const parent = this.writable(node);
      change(parent, token);
      return parent;
    }
    if (Array.isArray(node)) {
      const index = arrayIndex(node, token, false);
      const child = this.update(node[index] as Json, tokens, i + 1, pointer, change);
      if (child === node[index]) return node;
      const parent = this.writable(node);
      parent[index] = child;
      return parent;
    }
    if (!hasOwn(node, token)) throw new PatchError(`path ${pointer} not found`);
    const old = node[token] as Json;
    const child = this.update(old, tokens, i + 1, pointer, change);
    if (child === old) return node;
    const parent = this.writable(node);
    setMember(parent, token, child);
    return parent;
  }
}

function checkDepth(tokens: readonly string[], value: Json, pointer: string): void {
  if (tokens.length + depth(value, MAX_DEPTH - tokens.length) > MAX_DEPTH) {
    throw new PatchError(`${pointer}: the state would nest deeper than ${MAX_DEPTH} levels`);
  }
}

function add(w: Writer, doc: Json, tokens: readonly string[], value: Json, pointer: string): Json {
  checkDepth(tokens, value, pointer);
  if (tokens.length === 0) return value;
  return w.update(doc, tokens, 0, pointer, (parent, token) => {
    if (Array.isArray(parent)) parent.splice(arrayIndex(parent, token, true), 0, value);
    else setMember(parent, token, value);
  });
}

function replace(w: Writer, doc: Json, tokens: readonly string[], value: Json, pointer: string): Json {
  checkDepth(tokens, value, pointer);
  if (tokens.length === 0) return value;
  return w.update(doc, tokens, 0, pointer, (parent, token) => {
    if (Array.isArray(parent)) {
      parent[arrayIndex(parent, token, false)] = value;
    } else {
      if (!hasOwn(parent, token)) throw new PatchError(`path ${pointer} not found`);
      setMember(parent, token, value);
    }
  });
}

function remove(w: Writer, doc: Json, tokens: readonly string[], pointer: string): Json {
  if (tokens.length === 0) throw new PatchError("cannot remove the root");
  return w.update(doc, tokens, 0, pointer, (parent, token) => {
    if (Array.isArray(parent)) {
      parent.splice(arrayIndex(parent, token, false), 1);
    } else {
      if (!hasOwn(parent, token)) throw new PatchError(`path ${pointer} not found`);
      // eslint-disable-next-line @typescript-eslint/no-dynamic-delete -- a JSON member
      delete parent[token];
    }
  });
}

function field(op: Record<string, unknown>, name: string, index: number): unknown {
  if (!hasOwn(op, name)) throw new PatchError(`op ${index}: missing ${name}`);
  return op[name];
}

function pointerField(op: Record<string, unknown>, name: string, index: number): string {
  const value = field(op, name, index);
  if (typeof value !== "string") throw new PatchError(`op ${index}: ${name} must be a string`);
  return value;
}

/**
 * The document after `patch` (RFC 6902), or PatchError with `doc` unchanged. The result
 * shares every container the patch did not touch with `doc`.
 */
export function applyPatch(doc: Json, patch: unknown): Json {
  if (!Array.isArray(patch)) throw new PatchError("a patch must be an array of operations");
  const w = new Writer();
  let result = doc;
  patch.forEach((raw: unknown, index) => {
    if (!isObject(raw)) throw new PatchError(`op ${index} is not an object`);
    const op = raw as Record<string, unknown>;
    const name = op["op"];
    const path = pointerField(op, "path", index);
    const tokens = parsePointer(path);
    switch (name) {
      case "add":
        result = add(w, result, tokens, field(op, "value", index) as Json, path);
        break;
      case "replace":
        result = replace(w, result, tokens, field(op, "value", index) as Json, path);
        break;
      case "remove":
        result = remove(w, result, tokens, path);
        break;
      case "test":
        if (!jsonEqual(get(result, tokens, path), field(op, "value", index) as Json)) {
          throw new PatchError(`op ${index} (test ${path}): the value differs`);
        }
        break;
      case "copy": {
        const from = pointerField(op, "from", index);
        const value = get(result, parsePointer(from), from);
        result = add(w, result, tokens, value, path);
        w.forget();
        break;
      }
      case "move": {
        const from = pointerField(op, "from", index);
        const fromTokens = parsePointer(from);
        const value = get(result, fromTokens, from);
        if (from === path) break;
        if (fromTokens.length === 0 || (path.startsWith(from) && path[from.length] === "/")) {
          throw new PatchError(`op ${index}: cannot move ${from} into itself`);
        }
        result = add(w, remove(w, result, fromTokens, from), tokens, value, path);
        break;
      }
      default:
        throw new PatchError(`op ${index}: unknown op ${JSON.stringify(name)}`);
    }
  });
  return result;
}

/**
 * The document after `merge` (RFC 7396): a non-object replaces the whole document, `null`
 * removes a member. Shares every untouched container with `doc`.
 */
export function applyMerge(doc: Json, merge: Json): Json {
  return mergeInto(doc, merge, 0);
}

function mergeInto(target: Json | undefined, patch: Json, level: number): Json {
  if (!isObject(patch)) {
    if (level + depth(patch, MAX_DEPTH - level) > MAX_DEPTH) {
      throw new PatchError(`the state would nest deeper than ${MAX_DEPTH} levels`);
    }
    return patch;
  }
  if (level >= MAX_DEPTH) throw new PatchError(`the state would nest deeper than ${MAX_DEPTH} levels`);
  const base = isObject(target) ? target : {};
  const result: JsonObject = { ...base };
  for (const key of Object.keys(patch)) {
    const value = patch[key] as Json;
    if (value === null) {
      // eslint-disable-next-line @typescript-eslint/no-dynamic-delete -- a JSON member
      delete result[key];
    } else {
      setMember(result, key, mergeInto(member(base, key), value, level + 1));
    }
  }
  return result;
}

/** A delta document as the protocol carries it: exactly one of `patch` or `merge`. */
export type Delta = { patch: Operation[] } | { merge: Json };

/** `doc` after `delta`; PatchError (and `doc` unchanged) when it does not apply. */
export function applyDelta(doc: Json, delta: Delta): Json {
  return "patch" in delta ? applyPatch(doc, delta.patch) : applyMerge(doc, delta.merge);
}
