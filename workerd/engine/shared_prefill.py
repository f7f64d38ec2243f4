"""Requests with the same prompt prefill it once (the `n` choices of one chat request, sent by
the gateway as `n` requests with one prompt to one worker).

The first fresh request of a prompt *leads* it for as long as it lives. A later fresh request
with the same prompt takes the leader's KV (the engine forks it: `BlockManager.fork_prefix`,
the last partial block copied on write) with all but the last prompt token computed; it computes
that one token itself, whose logits give its own first token. While the leader's prompt is not
computed on the device (still prefilling, preempted, on the host tier) the newcomer *follows*
it: it waits here, and is forked after the leader's next step. Followers of a leader that goes
away (finished, aborted, migrated) queue as any request does. This is bookkeeping only: who
leads and who waits; the engine decides when a leader's KV can be taken and does the forks.
"""

from __future__ import annotations

from collections.abc import Iterable

from mell.workerd.engine.sequence import Sequence


class SharedPrefill:
    __slots__ = ("_followers", "_leaders")

    def __init__(self) -> None:
        self._leaders: dict[int, Sequence] = {}  # hash of a prompt -> its leader
        self._followers: dict[str, list[Sequence]] = {}  # leader id -> requests waiting on it

    @property
    def num_followers(self) -> int:
        return sum(len(f) for f in self._followers.values())

    @staticmethod
    def can_share(seq: Sequence) -> bool:
        """A request wanting its prompt's logprobs computes every position, and a one-token
        prompt has nothing to share."""
        return seq.sampling.prompt_logprobs is None and seq.num_prompt_tokens >= 2

    def leader_of(self, seq: Sequence) -> Sequence | None:
        """The live leader of `seq`'s prompt, if any."""
        leader = self._leaders.get(_key(seq))
        if leader is None or leader.token_ids[: leader.num_prompt_tokens] != _prompt(seq):
            return None
        return leader

    def lead(self, seq: Sequence) -> None:
        """`seq` leads its prompt (unless another does)."""
        key = _key(seq)
        if key not in self._leaders:
            self._leaders[key] = seq
            self._followers[seq.request_id] = []

    def wait(self, seq: Sequence, leader: Sequence) -> None:
        """`seq` waits for `leader`'s prompt to be computed."""
        self._followers[leader.request_id].append(seq)

    def computed(self, seqs: Iterable[Sequence]) -> list[tuple[Sequence, list[Sequence]]]:
        """The leaders among `seqs` whose prompt is computed, each with the requests that
        waited on it (no longer waiting: the caller forks them)."""
        out = []
        for seq in seqs:
            followers = self._followers.get(seq.request_id)
            if followers and seq.num_computed >= seq.num_prompt_tokens:
                out.append((seq, followers[:]))
                followers.clear()
        return out

    def leave(self, seq: Sequence) -> list[Sequence]:
        """`seq` leaves (finished, aborted, paused): a follower stops waiting; a leader stops
        leading and the requests waiting on it are returned, to go on alone."""
        followers = self._followers.pop(seq.request_id, None)
        if followers is not None:
            if self._leaders.get(_key(seq)) is seq:
                del self._leaders[_key(seq)]
            return followers
        for waiting in self._followers.values():
            if seq in waiting:
                waiting.remove(seq)
                break
        return []


def _prompt(seq: Sequence) -> list[int]:
    return seq.token_ids[: seq.num_prompt_tokens]


def _key(seq: Sequence) -> int:
    return hash(tuple(_prompt(seq)))
