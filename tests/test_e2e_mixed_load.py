"""The service under everything at once: chat (plain, streamed, through the console's proxy),
every kind of lesson, checkpoints and dashboard reads, for half a minute on the real launcher
(on until the first optimizer step under it, at most three minutes, on a slower machine).
No 5xx, no hang or broken connection, no client left waiting, optimizer steps and a
checkpoint version made during the load, every accepted example finished; the same load runs
ten minutes in bench/mixed_load.py."""

from __future__ import annotations

import pytest

from tests.support import mixed_load

pytestmark = pytest.mark.e2e

SECONDS = 30  # then every accepted lesson is trained: settling takes about as long


def test_half_a_minute_of_chat_lessons_and_checkpoints_breaks_nothing(default_stack):
    s = default_stack
    out = mixed_load.run(s.vllm, s.train, s.manifest()["model_path"], SECONDS,
                         post_pause=4, checkpoint_every=10, settle=600, max_seconds=180)
    tally, states = out["tally"], out["states"]
    report = mixed_load.table(out)
    print(f"\n{report}\nexamples: {sorted(states.values())}")
    for bucket in ("5xx", "transport", "hang", "4xx"):
        assert tally.count(bucket) == 0, f"{bucket}:\n{report}"
    assert out["alive"] == 0, "a client never returned (deadlock)"
    answered = {r["kind"]: r.get("ok", 0) for r in tally.rows()}
    assert answered.get("chat", 0) > 0 and answered.get("chat (stream)", 0) > 0, report
    # lessons were learned while people chatted, and a checkpoint made a version of them
    assert out["steps_under_load"] >= 1, report
    assert any(c.get("version") is not None for c in out["checkpoints"]), \
        f"no checkpoint under the load wrote a version: {out['checkpoints']}\n{report}"
    assert len(states) >= 5, report  # every kind of lesson was accepted at least once
    # nothing accepted is lost: each one finished, trained or failed with its reason
    assert set(states.values()) <= {"trained", "failed"}, states
