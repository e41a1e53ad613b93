"""Child of tests/test_rollback_crash.py: a training engine on a stand-in owner's export that
rolls the live weights back and forth between versions, printing "begin TARGET" and "done",
until killed. At start the engine finishes a rollback a killed child left (its marker); then
the child prints "ready" and waits for "go" on stdin.

    python -m tests.support.crash_rollback_child MODEL_DIR EXPORT_DIR
"""

import sys
from types import SimpleNamespace

from checkpoint import Checkpointer
from server.engine.coordination import VllmCoordinator
from server.engine.wiring import assemble, retention
from server.settings import Settings
from weight_mapping import attach, build_model, checkpoint_file_names, load_config

TARGETS = ["original", 1, 2, 1, "original", 2]


def main() -> None:
    model_dir, export_dir = sys.argv[1], sys.argv[2]
    settings = Settings(export_dir=export_dir, journal="off", drift_probes=0, guard="none")
    export = attach(export_dir, timeout=60)
    model = build_model(export.tensors, load_config(model_dir))
    params = dict(model.named_parameters(remove_duplicate=False))
    ck = Checkpointer(model_dir, params, history=retention(settings),
                      file_names=checkpoint_file_names(list(params), set(params)))
    engine = assemble(settings, model, SimpleNamespace(pad_token_id=0), model_path=model_dir,
                      export=export, checkpointer=ck, coordinator=VllmCoordinator(export))
    engine.start()
    print("ready", flush=True)
    sys.stdin.readline()
    k = 0
    while True:
        target = TARGETS[k % len(TARGETS)]
        print(f"begin {target}", flush=True)
        engine.versions.rollback(target)
        print("done", flush=True)
        k += 1


if __name__ == "__main__":
    main()
