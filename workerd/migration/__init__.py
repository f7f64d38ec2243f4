"""Live request migration between workers, as two explicit state machines (Llumnix §2.2).

`OutgoingMigration` (`outgoing.py`) runs on the source, `IncomingMigration` (`incoming.py`) on
the destination; each has a
`state` (IntEnum) and one method per protocol step. A step checks the state, does one thing,
moves to the next state and sends one message. KV transfer:

    source                                   destination
    RESERVING  --MigrateReserve(stage, n)-->  reserve n blocks in total   --MigrateAck-->
    COPYING    --MigrateBlocks per layer and
                 ~4 MiB (runs of blocks as frames),
                 MigrateStageEnd(stage)----->  write each frame as it comes --MigrateAck-->
    (repeat for the blocks added meanwhile; when at most k remain, pause the request first:
     the last stage copies the rest, the partly written block included)
    COMMITTING --MigrateCommit(request)----->  the reservation becomes the request; it joins the
                                               batch; MigratedIn to the gateway --MigrateAck-->
    COMMITTED: the source frees the request, tells the gateway `MigrationEnded(committed)`.

A request whose KV waits on the source's host tier (LayerKV: swapped out or parked) migrates
the same way in one stage (paused at once: it does not grow), its blocks read from host memory;
a destination short of device blocks may reserve host blocks instead, and the request arrives
parked there, reloaded in its turn.

A token transfer is the same machine without the copy stages: pause, commit with the token ids
and sampling state (num_computed 0: the destination re-prefills). Every wait has a deadline;
any failure (request finished or preempted, no blocks at the destination, peer gone, deadline,
stage limit) aborts: the source resumes the request (nothing lost), the destination frees its
reservation (nothing leaked). Destination handlers are idempotent per (migration id, stage,
step): a repeated message gets the same answer and changes nothing.
"""
