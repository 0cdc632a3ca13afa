"""Quick start: pages, a dependency, writes, propagation, replay, checkpoint, stats.

Run it with ``python examples/quickstart.py``.
"""

import os
import tempfile

import mmsb


def main() -> None:
    with mmsb.mmsb_start(enable_gpu=False) as state:
        # Two 16-byte pages: "source" and "upper", a derived page.
        src = mmsb.create_page(state, 16, metadata={"name": "source"})
        upper = mmsb.create_page(state, 16, metadata={"name": "upper"})

        # upper is recomputed from source whenever source changes.
        mmsb.add_dependency(state, src.id, upper.id, mmsb.DATA_DEPENDENCY)
        mmsb.register_passthrough_recompute(state, upper.id, src.id, lambda b: b.upper())

        changes = []
        mmsb.subscribe(state, mmsb.EventType.PAGE_CHANGED,
                       lambda _s, _et, pid, epoch, _did: changes.append((pid, epoch)))

        mmsb.update_page(state, src.id, b"hello, state bus")
        mmsb.write_page(state, src.id, 0, b"HELLO")          # a partial write
        print("source:", mmsb.query_page(state, src.id))
        print("upper: ", mmsb.query_page(state, upper.id))
        print("events:", changes)

        # Every change is a delta in the log; propagation's deltas too.
        for d in state.tlog:
            print(f"  lsn {d.lsn}: page {d.page_id} epoch {d.base_epoch}->{d.epoch} "
                  f"{d.source} ({d.count} bytes)")

        # Replay: the past, rebuilt exactly from the log.
        past = mmsb.replay_to_epoch(state, 1)
        print("source at epoch 1:", mmsb.query_page(past, src.id))
        assert mmsb.verify_state_consistency(state)

        # Checkpoint to a file and restore it into a fresh state.
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "quickstart.mmsbckpt")
            mmsb.checkpoint_log(state, path)
            restored = mmsb.MMSBState()
            mmsb.load_checkpoint(restored, path)
            assert mmsb.query_page(restored, upper.id) == mmsb.query_page(state, upper.id)
            print("restored", len(restored.pages), "pages from", os.path.getsize(path), "bytes")

        stats = mmsb.get_stats(state)
        print(f"stats: {stats.total_pages} pages, {stats.total_deltas} deltas, "
              f"{stats.propagation_count} propagation passes")


if __name__ == "__main__":
    main()
