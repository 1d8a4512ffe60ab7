import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, it } from "node:test";
import { applyMerge, applyPatch, type Json, jsonEqual, MAX_DEPTH, PatchError } from "../src/index.js";
import { REPO } from "./helpers.js";

interface Case {
  comment?: string;
  doc: Json;
  patch: unknown;
  expected?: Json;
  error?: string;
  disabled?: boolean;
}

// The same cases as the engine's (tests/test_delta_conformance.py, rust/tests/conformance.rs).
const cases = JSON.parse(readFileSync(join(REPO, "tests/data/rfc6902-spec-tests.json"), "utf8")) as Case[];

describe("RFC 6902 conformance (tests/data/rfc6902-spec-tests.json)", () => {
  const enabled = cases.filter((c) => c.disabled !== true);
  it("has cases", () => {
    assert.ok(enabled.length >= 16, `only ${enabled.length} cases`);
  });
  for (const [i, c] of enabled.entries()) {
    it(`${i}: ${c.comment ?? ""}`, () => {
      const before = structuredClone(c.doc);
      if (c.error !== undefined) {
        assert.throws(() => applyPatch(c.doc, c.patch), PatchError);
      } else {
        assert.deepEqual(applyPatch(c.doc, c.patch), c.expected);
      }
      // Copy-on-write: the input document is never changed, even by a failing patch.
      assert.deepEqual(c.doc, before);
    });
  }
});

// RFC 7396 Appendix A, all examples: (original, patch, result).
const RFC7396: [Json, Json, Json][] = [
  [{ a: "b" }, { a: "c" }, { a: "c" }],
  [{ a: "b" }, { b: "c" }, { a: "b", b: "c" }],
  [{ a: "b" }, { a: null }, {}],
  [{ a: "b", b: "c" }, { a: null }, { b: "c" }],
  [{ a: ["b"] }, { a: "c" }, { a: "c" }],
  [{ a: "c" }, { a: ["b"] }, { a: ["b"] }],
  [{ a: { b: "c" } }, { a: { b: "d", c: null } }, { a: { b: "d" } }],
  [{ a: [{ b: "c" }] }, { a: [1] }, { a: [1] }],
  [["a", "b"], ["c", "d"], ["c", "d"]],
  [{ a: "b" }, ["c"], ["c"]],
  [{ a: "foo" }, null, null],
  [{ a: "foo" }, "bar", "bar"],
  [{ e: null }, { a: 1 }, { e: null, a: 1 }],
  [[1, 2], { a: "b", c: null }, { a: "b" }],
  [{}, { a: { bb: { ccc: null } } }, { a: { bb: {} } }],
];

describe("RFC 7396 Appendix A", () => {
  for (const [i, [original, patch, result]] of RFC7396.entries()) {
    it(`example ${i + 1}`, () => {
      const before = structuredClone(original);
      assert.deepEqual(applyMerge(original, patch), result);
      assert.deepEqual(original, before);
    });
  }
});

describe("the engine's rules (docs/protocol.md, Deltas)", () => {
  it("applies a patch atomically: a failing op leaves the document as it was", () => {
    const doc = { a: 1, list: [1, 2] };
    assert.throws(
      () =>
        applyPatch(doc, [
          { op: "add", path: "/b", value: 2 },
          { op: "remove", path: "/missing" },
        ]),
      PatchError,
    );
    assert.deepEqual(doc, { a: 1, list: [1, 2] });
  });

  it("compares numbers by value in test, objects regardless of order", () => {
    assert.deepEqual(applyPatch({ n: 1, o: { a: 1, b: 2 } }, [
      { op: "test", path: "/n", value: 1.0 },
      { op: "test", path: "/o", value: { b: 2, a: 1 } },
    ]), { n: 1, o: { a: 1, b: 2 } });
    assert.throws(() => applyPatch({ n: 1 }, [{ op: "test", path: "/n", value: true }]), PatchError);
    assert.ok(!jsonEqual([1], { 0: 1 }));
  });

  it("refuses to remove the root, and moves into a child; allows - as a move target", () => {
    assert.throws(() => applyPatch({ a: 1 }, [{ op: "remove", path: "" }]), PatchError);
    assert.throws(() => applyPatch({ a: { b: 1 } }, [{ op: "move", from: "/a", path: "/a/b/c" }]), PatchError);
    assert.deepEqual(applyPatch({ a: 1, l: [0] }, [{ op: "move", from: "/a", path: "/l/-" }]), { l: [0, 1] });
    assert.deepEqual(applyPatch({ a: 1 }, [{ op: "replace", path: "", value: [1] }]), [1]);
  });

  it("refuses bad pointers and array indexes", () => {
    assert.throws(() => applyPatch({ a: 1 }, [{ op: "add", path: "a", value: 1 }]), PatchError);
    assert.throws(() => applyPatch({ "a~b": 1 }, [{ op: "remove", path: "/a~2b" }]), PatchError);
    assert.throws(() => applyPatch({ l: [1] }, [{ op: "replace", path: "/l/01", value: 1 }]), PatchError);
    assert.throws(() => applyPatch({ l: [1] }, [{ op: "add", path: "/l/2", value: 1 }]), PatchError);
    assert.throws(() => applyPatch({ l: [1] }, [{ op: "remove", path: "/l/-" }]), PatchError);
    assert.throws(() => applyPatch({}, [{ op: "frobnicate", path: "/a" }]), PatchError);
    assert.throws(() => applyPatch({}, [{ op: "add", path: "/a" }]), PatchError);
    assert.throws(() => applyPatch({}, { op: "add", path: "/a", value: 1 }), PatchError);
    assert.deepEqual(applyPatch({ "a/b": 1, "m~n": 2 }, [
      { op: "remove", path: "/a~1b" },
      { op: "replace", path: "/m~0n", value: 3 },
    ]), { "m~n": 3 });
  });

  it("treats __proto__ as an ordinary member, as the relay does", () => {
    const doc = JSON.parse('{"__proto__":{"x":1}}') as Json;
    const patched = applyPatch(doc, [{ op: "add", path: "/__proto__/y", value: 2 }]) as Record<string, unknown>;
    assert.equal(Object.getPrototypeOf(patched), Object.prototype);
    assert.deepEqual(Object.keys(patched), ["__proto__"]);
    assert.equal(JSON.stringify(patched), '{"__proto__":{"x":1,"y":2}}');
    const merged = applyMerge({}, JSON.parse('{"__proto__":{"polluted":true}}') as Json) as Record<string, unknown>;
    assert.equal(JSON.stringify(merged), '{"__proto__":{"polluted":true}}');
    assert.equal(({} as Record<string, unknown>)["polluted"], undefined);
  });

  it("fails an op that would nest the state deeper than 128 levels", () => {
    let deep: Json = 1;
    for (let i = 0; i < MAX_DEPTH - 1; i++) deep = [deep];
    assert.doesNotThrow(() => applyPatch({}, [{ op: "add", path: "/a", value: deep }]));
    assert.throws(() => applyPatch({}, [{ op: "add", path: "/a", value: [deep] }]), PatchError);
    assert.throws(() => applyMerge({}, { a: [deep] }), PatchError);
  });

  it("shares untouched parts and never changes the previous state, also after a copy", () => {
    const doc = { big: { keep: [1, 2, 3] }, x: { y: 1 } };
    const copied = applyPatch(doc, [
      { op: "copy", from: "/x", path: "/z" },
      { op: "replace", path: "/z/y", value: 2 },
      { op: "add", path: "/x/w", value: 3 },
    ]) as Record<string, Json>;
    assert.deepEqual(copied, { big: { keep: [1, 2, 3] }, x: { y: 1, w: 3 }, z: { y: 2 } });
    assert.equal(copied["big"], doc.big);
    assert.deepEqual(doc, { big: { keep: [1, 2, 3] }, x: { y: 1 } });
    // A value copied twice within one patch stays two values.
    const twice = applyPatch({ a: { n: 0 } }, [
      { op: "add", path: "/a/n", value: 1 },
      { op: "copy", from: "/a", path: "/b" },
      { op: "replace", path: "/a/n", value: 2 },
    ]);
    assert.deepEqual(twice, { a: { n: 2 }, b: { n: 1 } });
  });
});
