"""Every message and event round-trips through its channel's codec; unions stay closed."""

from __future__ import annotations

import msgspec
import pytest

from mell.common import events as ev
from mell.common import messages as m
from mell.common.sampling import SamplingParams, TokenLogprobs
from mell.common.workers import RequestLoad, WorkerIdentity, WorkerLoad
from mell.transport.codec import Codec

WORKER_MESSAGES = [
    m.Hello(
        identity=WorkerIdentity(
            worker_id="w0",
            boot_id="b",
            model="mell-tiny",
            capacity_blocks=10,
            block_size=16,
            max_model_len=2048,
            data_address="tcp://127.0.0.1:1",
        ),
        request_ids=["r1"],
    ),
    m.Heartbeat(3),
    m.TokenBatch(
        4,
        [
            m.TokenOutput(
                "r1",
                2,
                [5, 6],
                [TokenLogprobs(-0.5, [5], [-0.5]), TokenLogprobs(-1.0, [], [])],
                "stop",
                7,
            )
        ],
    ),
    m.LoadReport(
        load=WorkerLoad(
            num_running=1,
            num_waiting=0,
            num_total_blocks=10,
            num_free_blocks=8,
            num_preemptions_total=0,
            requests=[RequestLoad("r1", 2, 20)],
        )
    ),
    m.RequestFailed(request_id="r1", code="BadRequestError", message="too long"),
    m.WorkerFailed(code="InternalServerError", message="boom"),
    m.DrainCompleted(True),
    m.Reply(call_id=5, error=None),
]
GATEWAY_MESSAGES = [
    m.Welcome(gateway_boot_id="g", epoch_s=0.25),
    m.Rejoin(),
    m.AddRequest("r1", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0, seed=3)),
    m.AbortRequest(["r1", "r2"]),
    m.Drain(call_id=2),
    m.Undrain(call_id=3),
    m.Ping(call_id=4),
]


@pytest.mark.parametrize("message", WORKER_MESSAGES, ids=lambda x: type(x).__name__)
def test_worker_messages_round_trip(message: object) -> None:
    codec: Codec[m.WorkerMessage] = Codec(m.WorkerMessage)
    assert codec.decode(codec.encode(message))[0] == message


@pytest.mark.parametrize("message", GATEWAY_MESSAGES, ids=lambda x: type(x).__name__)
def test_gateway_messages_round_trip(message: object) -> None:
    codec: Codec[m.GatewayMessage] = Codec(m.GatewayMessage)
    assert codec.decode(codec.encode(message))[0] == message


def test_token_batch_is_compact() -> None:
    batch = m.TokenBatch(
        1, [m.TokenOutput(f"cmpl-{i:032x}", 10, [42], None, None, 5) for i in range(256)]
    )
    size = len(msgspec.msgpack.encode(batch))
    assert size < 256 * 50  # ~id + a few bytes per request


def test_event_envelopes_round_trip() -> None:
    events = [
        ev.WorkerJoined(
            identity=WorkerIdentity(
                worker_id="w0",
                boot_id="b",
                model="m",
                capacity_blocks=4,
                block_size=16,
                max_model_len=64,
                data_address="tcp://x:1",
            )
        ),
        ev.LoadReported(
            worker_id="w0",
            load=WorkerLoad(
                num_running=1,
                num_waiting=0,
                num_total_blocks=4,
                num_free_blocks=3,
                num_preemptions_total=0,
                requests=[RequestLoad("r", 1, 5)],
            ),
        ),
        ev.RequestPlaced(
            request_id="r",
            model="m",
            worker_id="w0",
            num_prompt_tokens=4,
            max_tokens=8,
            num_blocks=1,
        ),
        ev.MigrationAborted(
            migration_id="mig", request_id="r", src="w0", dst="w1", kind="kv", reason="deadline"
        ),
    ]
    for i, event in enumerate(events, 1):
        envelope = ev.EventEnvelope("gateway", i, 1.5, event)
        assert ev.decode_envelope(ev.encode_envelope(envelope)) == envelope


def test_event_names_are_past_tense() -> None:
    for cls in ev.Event.__args__:  # type: ignore[attr-defined]
        name = cls.__name__
        assert name.endswith(("ed", "Lost")), name


def test_a_flat_event_from_before_the_shared_structs_does_not_decode() -> None:
    """Journals written before `WorkerIdentity` was embedded fail loudly, never misread."""
    flat = {
        "type": "WorkerJoined",
        "worker_id": "w0",
        "boot_id": "b",
        "model": "m",
        "capacity_blocks": 4,
        "block_size": 16,
        "max_model_len": 64,
        "data_address": "",
    }
    with pytest.raises(msgspec.ValidationError, match="identity"):
        ev.decode_envelope(msgspec.msgpack.encode(["w0", 1, 1.0, flat]))
