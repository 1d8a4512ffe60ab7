/**
 * Presence through the client (docs/protocol.md, presence) against a real relay: members
 * read when a join completes, kept up to date by presence_join / presence_leave, and
 * `room.presence()`. Needs the relay's presence (#14 lands it beside this client): against
 * a relay without it these tests fail, by design.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { Client, type Member } from "../src/index.js";
import { type Relay, startRelay, until } from "./helpers.js";

describe("presence (memory backend)", () => {
  let relay: Relay;
  before(async () => {
    relay = await startRelay();
  });
  after(async () => {
    await relay.stop();
  });

  for (const format of ["json", "msgpack"] as const) {
    it(`members come and go, each once (${format})`, async () => {
      const a = new Client(relay.url, { format });
      const b = new Client(relay.url, { format });
      const c = new Client(relay.url, { format });
      try {
        const ra = a.room(`p-${format}`, { presence: true });
        const seen: Member[][] = [];
        ra.on("presence", (members) => seen.push(members));
        await ra.join();
        await until(() => ra.members.length === 1, "a sees itself");
        const me = ra.members[0] as Member;
        assert.equal(me.sub, null); // anonymous
        assert.deepEqual(me.info, {});

        // A member without presence events still counts as a member.
        const rb = b.room(`p-${format}`);
        await rb.join();
        await until(() => ra.members.length === 2, "b's presence_join");
        const rc = c.room(`p-${format}`, { presence: true });
        await rc.join();
        await until(() => ra.members.length === 3 && rc.members.length === 3, "c joined");
        assert.deepEqual(new Set(ra.members.map((m) => m.conn)), new Set(rc.members.map((m) => m.conn)));
        assert.equal(new Set(ra.members.map((m) => m.conn)).size, 3);

        const listed = await rb.presence();
        assert.deepEqual(new Set(listed.map((m) => m.conn)), new Set(ra.members.map((m) => m.conn)));

        await rb.leave();
        await until(() => ra.members.length === 2 && rc.members.length === 2, "b's presence_leave");
        c.close(); // a lost connection leaves too
        await until(() => ra.members.length === 1, "c's presence_leave");
        assert.deepEqual(ra.members.map((m) => m.conn), [me.conn]);
        // Every change was reported, and no member twice in one list.
        for (const members of seen) assert.equal(new Set(members.map((m) => m.conn)).size, members.length);
      } finally {
        a.close();
        b.close();
        c.close();
      }
    });
  }
});
