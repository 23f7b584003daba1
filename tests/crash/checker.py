"""Checker of the kvmem crash test: run after the server was killed and
restarted on the same data dir.

For every session of the journal:
1. GetSession finds it (a session whose creation was acknowledged must
   survive), with its shape and durability unchanged.
2. durable_position >= the largest durable_position any step reply or
   Checkpoint ever acknowledged (nothing acknowledged as durable is lost).
3. Every layer's next position >= durable_position (the server resumes at or
   after what it promised), <= the highest position ever sent to that layer
   (no phantom tokens), and on a boundary of the session's planned steps (a
   step is applied whole or not at all); `position` is the least of them.
4. The last step of each layer, sent again identically, is answered as a
   retry and not applied twice (reported as a note unless strict, since the
   contract's retry after a restart depends on the server rebuilding kept
   replies). Layers resuming ahead of durable_position are a note too (the
   design rolls them back to it; resuming ahead is honest, just not that).
5. The session goes on from the reported positions (the lagging layers first,
   then every layer) with the generator's inputs, every reply checked as in
   the load, until a planned decode FETCH: that FETCH must return, for every
   layer and KV head, positions 0..t and every key and value exactly as the
   generator sent them. Any DATA_LOSS status is a violation.
6. GetSession afterwards agrees with the positions stepped to.

Usable by hand: /usr/bin/python3 tests/crash/checker.py --address A --journal J
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Optional, Sequence

import grpc

import loadgen
from loadgen import (LAYERS, RPC_TIMEOUT_S, Context, SessionDriver,
                     SessionSpec, StepFailed, UnaryTransport)

# The continuation's planned steps before giving up finding a FETCH.
MAX_CONTINUE_STEPS = 400
# Planned steps taken before the verifying FETCH may end the continuation.
MIN_CONTINUE_STEPS = 2


@dataclasses.dataclass
class JournalState:
    """What the journal says was acknowledged and sent."""

    seed: Optional[int] = None
    sessions: int = 0
    created: set[str] = dataclasses.field(default_factory=set)
    max_durable: dict[str, int] = dataclasses.field(default_factory=dict)
    last_ack: dict[tuple[str, int], int] = dataclasses.field(
        default_factory=dict)
    max_sent: dict[tuple[str, int], int] = dataclasses.field(
        default_factory=dict)

    @staticmethod
    def from_records(records: Sequence[dict[str, Any]]) -> "JournalState":
        """Folds a journal's records."""
        state = JournalState()
        for r in records:
            kind = r["e"]
            if kind == "config" and state.seed is None:
                state.seed = r["seed"]
                state.sessions = r["sessions"]
            elif kind == "created":
                state.created.add(r["s"])
            elif kind == "ack":
                state.max_durable[r["s"]] = max(
                    state.max_durable.get(r["s"], 0), r["d"])
                state.last_ack[(r["s"], r["l"])] = r["n"]
                key = (r["s"], r["l"])
                state.max_sent[key] = max(state.max_sent.get(key, 0), r["n"])
            elif kind == "ckpt":
                state.max_durable[r["s"]] = max(
                    state.max_durable.get(r["s"], 0), r["d"])
            elif kind == "sent":
                key = (r["s"], r["l"])
                state.max_sent[key] = max(state.max_sent.get(key, 0), r["end"])
        return state


@dataclasses.dataclass
class SessionOutcome:
    """What the checker found for one session."""

    spec: SessionSpec
    found: bool = True
    failed: bool = False  # a call failed: the check stopped there
    resumed: list[int] = dataclasses.field(default_factory=list)
    durable: int = 0
    acked_durable: int = 0
    last_acked: int = 0
    verified_to: int = 0
    final_position: int = 0
    final_durable: int = 0

    def summary(self) -> str:
        """e.g. `s1:A/fp32 801>790 d790>=785 ok@812`: last acknowledged
        position, resumed position, durable_position >= acknowledged durable,
        position verified through."""
        if not self.found:
            return "%s LOST" % self.spec.label
        if self.failed:
            return "%s FAILED" % self.spec.label
        resumed = min(self.resumed) if self.resumed else 0
        uneven = "" if len(set(self.resumed)) <= 1 else "(%s)" % ",".join(
            map(str, self.resumed))
        return "%s %d>%d%s d%d>=%d ok@%d" % (
            self.spec.label, self.last_acked, resumed, uneven, self.durable,
            self.acked_durable, self.verified_to)


class Checker:
    """Checks every session of a restarted server against the journal."""

    def __init__(self, ctx: Context, address: str) -> None:
        self.ctx = ctx
        self.address = address

    def run(self, state: JournalState,
            expect: Optional[dict[str, tuple[list[int], int]]] = None
            ) -> list[SessionOutcome]:
        """Checks each session in turn. `expect` (after a graceful restart)
        maps a session id to the layer positions and durable_position it had
        when the server was stopped: a graceful stop must keep them all."""
        channel = grpc.insecure_channel(self.address,
                                        options=loadgen.CHANNEL_OPTIONS)
        stub = self.ctx.rpc.KvMemoryStub(channel)
        transport = UnaryTransport(stub, RPC_TIMEOUT_S * 4)
        outcomes = []
        try:
            for spec in self.ctx.specs:
                outcome = SessionOutcome(spec)
                outcomes.append(outcome)
                try:
                    self._check(stub, transport, spec, state, outcome,
                                None if expect is None
                                else expect.get(spec.session_id))
                except StepFailed as failure:
                    outcome.failed = True
                    if self.ctx.killing.is_set():
                        break  # the server was killed on purpose
                    category = ("data-loss"
                                if failure.code == grpc.StatusCode.DATA_LOSS
                                else "check-status")
                    self.ctx.report.violation(
                        category, spec.label, "cycle %d %s: %s"
                        % (self.ctx.cycle, self.ctx.phase, failure))
        finally:
            channel.close()
        return outcomes

    def _check(self, stub: Any, transport: UnaryTransport, spec: SessionSpec,
               state: JournalState, outcome: SessionOutcome,
               expect: Optional[tuple[list[int], int]]) -> None:
        ctx, report = self.ctx, self.ctx.report
        pb = ctx.pb
        sid = spec.session_id
        where = "cycle %d %s" % (ctx.cycle, ctx.phase)
        acked = state.max_durable.get(sid, 0)
        outcome.acked_durable = acked
        outcome.last_acked = min(
            (state.last_ack.get((sid, layer), 0) for layer in range(LAYERS)),
            default=0)
        try:
            session = stub.GetSession(pb.GetSessionRequest(session_id=sid),
                                      timeout=RPC_TIMEOUT_S * 4)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise StepFailed.from_rpc(error) from None
            if sid not in state.created:
                return  # never created: nothing to check
            outcome.found = False
            report.violation(
                "session-lost", spec.label,
                "%s: GetSession is NOT_FOUND after its creation was "
                "acknowledged (acknowledged durable_position %d)"
                % (where, acked))
            session = loadgen.create_session(ctx, stub, spec)
        want = ctx.new_session_request(spec)
        fields = ("layers", "kv_heads", "query_heads", "head_dim", "dtype")
        got_shape = [getattr(session.shape, f) for f in fields]
        want_shape = [getattr(want.shape, f) for f in fields]
        if got_shape != want_shape or session.durability != want.durability:
            report.violation(
                "manifest-changed", spec.label,
                "%s: %s %s durability %d, want %s durability %d"
                % (where, "/".join(fields), got_shape, session.durability,
                   want_shape, want.durability))
        layers = [int(x) for x in session.layer_next_positions]
        durable = int(session.durable_position)
        outcome.resumed, outcome.durable = layers, durable
        if len(layers) != LAYERS:
            report.violation("layer-positions", spec.label,
                             "%s: %d layer_next_positions, want %d"
                             % (where, len(layers), LAYERS))
            return
        if durable < acked:
            report.violation(
                "durable-lost", spec.label,
                "%s: durable_position %d after the restart, but a reply "
                "acknowledged %d as durable (%d acknowledged tokens lost; "
                "layers resume at %s)" % (where, durable, acked,
                                          acked - durable, layers))
        chain = ctx.chains[spec.index]
        for layer, at in enumerate(layers):
            sent = state.max_sent.get((sid, layer), 0)
            if at < durable:
                report.violation(
                    "resume-below-durable", spec.label,
                    "%s: layer %d resumes at %d, below durable_position %d"
                    % (where, layer, at, durable))
            if at > sent:
                report.violation(
                    "phantom-tokens", spec.label,
                    "%s: layer %d resumes at %d, but only [0, %d) was ever "
                    "sent to it" % (where, layer, at, sent))
            if not chain.is_boundary(at):
                report.violation(
                    "partial-step", spec.label,
                    "%s: layer %d resumes at %d, inside a step that was sent "
                    "whole" % (where, layer, at))
        if max(layers) > durable:
            report.note(
                "not-rolled-back", spec.label,
                "%s: layers resume at %s with durable_position %d (the design "
                "rolls layers ahead of durable_position back to it)"
                % (where, layers, durable))
        if session.position != min(layers):
            report.violation(
                "position", spec.label,
                "%s: position %d, but layer_next_positions %s"
                % (where, session.position, layers))
        if expect is not None and (layers != expect[0]
                                   or durable < expect[1]):
            report.violation(
                "graceful-restart", spec.label,
                "%s: after a graceful stop layers resume at %s durable %d, "
                "want %s durable >= %d" % (where, layers, durable, expect[0],
                                           expect[1]))
        if any(at > sent for at, sent in zip(
                layers, (state.max_sent.get((sid, layer), 0)
                         for layer in range(LAYERS)))):
            return  # cannot step on from positions that were never sent
        if not all(chain.is_boundary(at) for at in layers):
            return
        driver = SessionDriver(ctx, spec, session)
        try:
            self._retry_last(transport, driver)
            self._continue(transport, driver)
        finally:
            driver.flush_sent()
        outcome.verified_to = driver.position
        try:
            final = stub.GetSession(pb.GetSessionRequest(session_id=sid),
                                    timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as error:
            raise StepFailed.from_rpc(error) from None
        final_layers = [int(x) for x in final.layer_next_positions]
        outcome.final_position = int(final.position)
        outcome.final_durable = int(final.durable_position)
        if final_layers != driver.next or final.position != driver.position:
            report.violation(
                "position", spec.label,
                "%s: after stepping to %s GetSession says layers %s position "
                "%d" % (where, driver.next, final_layers, final.position))
        if final.durable_position < driver.durable or (
                spec.sync and final.durable_position < driver.position):
            report.violation(
                "durable-regressed" if final.durable_position < driver.durable
                else "sync-not-durable", spec.label,
                "%s: GetSession durable_position %d after replies said %d "
                "(position %d)" % (where, final.durable_position,
                                   driver.durable, driver.position))

    def _continue(self, transport: UnaryTransport,
                  driver: SessionDriver) -> None:
        """Steps the session on from where it resumed: the lagging layers up
        to the furthest, then planned steps until a planned decode FETCH
        (every layer), whose replies are verified whole."""
        loadgen.level_layers(self.ctx, transport, driver)
        taken = 0
        while True:
            tokens, mode = driver.planned(driver.position)
            loadgen.step_token(self.ctx, transport, [driver])
            taken += 1
            if (mode == self.ctx.pb.STEP_MODE_FETCH and tokens == 1
                    and taken >= MIN_CONTINUE_STEPS):
                return
            if taken >= MAX_CONTINUE_STEPS:
                raise StepFailed(grpc.StatusCode.INTERNAL,
                                 "no planned FETCH within %d steps"
                                 % MAX_CONTINUE_STEPS)

    def _retry_last(self, transport: UnaryTransport,
                    driver: SessionDriver) -> None:
        """Sends each layer's last planned step again; it must be answered
        as a retry (next_position unchanged), not applied twice."""
        ctx, spec = self.ctx, driver.spec
        chain = ctx.chains[spec.index]
        for layer in range(LAYERS):
            at = driver.next[layer]
            last = chain.step_ending_at(at)
            if last is None:
                continue
            start, tokens, mode = last
            entry = ctx.entry(spec, layer, start, tokens, mode)
            request = ctx.pb.StepRequest(layer=layer, mode=mode,
                                         entries=[entry],
                                         request_id=ctx.request_id())
            where = ("cycle %d %s layer %d: the last step [%d, %d) %s sent "
                     "again" % (ctx.cycle, ctx.phase, layer, start, at,
                                loadgen.mode_name(ctx.pb, mode)))
            try:
                reply = transport.step(request)
            except StepFailed as failure:
                if (failure.code in (grpc.StatusCode.DATA_LOSS,
                                     grpc.StatusCode.UNAVAILABLE)
                        or ctx.killing.is_set()):
                    raise
                if (failure.code == grpc.StatusCode.FAILED_PRECONDITION
                        and "too large to keep" in failure.details):
                    ctx.report.count("restart_retries_refused_too_large")
                    continue
                message = "%s after the restart: %s" % (where, failure)
                ctx.report.count("restart_retries_refused")
                ctx.report.note("retry-after-restart", spec.label, message)
                continue
            ctx.report.count("restart_retries_answered")
            result = reply.results[0]
            if result.next_position != at:
                ctx.report.violation(
                    "retry-applied-twice", spec.label,
                    "%s: next_position %d, want %d" % (where,
                                                       result.next_position,
                                                       at))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Checks a server against a journal once."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--build", default=loadgen.default_build())
    parser.add_argument("--strict", action="store_true",
                        help="notes count as violations")
    args = parser.parse_args(argv)
    pb, rpc = loadgen.load_stubs(args.build)
    state = JournalState.from_records(loadgen.Journal.read(args.journal))
    if state.seed is None:
        print("journal %s has no config record" % args.journal)
        return 2
    journal = loadgen.Journal(args.journal)
    report = loadgen.Report(args.strict)
    ctx = Context(pb, rpc, state.seed, journal, report, "check", 0,
                  loadgen.session_specs(state.sessions), set(state.created),
                  full_verify=True)
    started = time.monotonic()
    for outcome in Checker(ctx, args.address).run(state):
        print(outcome.summary())
    print("checked in %.2f s" % (time.monotonic() - started))
    print("\n".join(report.lines(report.violations)) or "no violations")
    journal.close()
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
