"""How tests/data/registry-m0001.db was made: a registry at migration m0001 holding rows.

Kept so the stored file can be regenerated; the test uses the stored file, as a user's
old registry would be, not this script.

    python tests/data/make_registry_m0001.py tests/data/registry-m0001.db
"""

import sys

from sqlalchemy import create_engine, text

from skillhub.registry.migrations import migrate

engine = create_engine(f"sqlite:///{sys.argv[1]}")
migrate(engine, up_to="m0001_initial")
with engine.begin() as connection:
    connection.execute(text(
        "INSERT INTO base_models (id, name, location, revision, architecture, model_type, fingerprint, registered_at) "
        "VALUES (1, 'tiny-base', '/models/tiny-base', NULL, 'LlamaForCausalLM', 'llama', "
        "'sha256:" + "ab" * 32 + "', '2026-11-01T10:00:00.000000Z')"))
    for position, (pack_id, task) in enumerate([("0123456789ab", "math"), ("ba9876543210", "code")], start=1):
        connection.execute(text(
            "INSERT INTO packs (id, base_id, name, task, version, sha256, bytes, ratio, parent_id, state, purged, "
            "position, added_at, manifest) VALUES (:id, 1, :task, :task, '1.0.0', :sha, 1000, 0.07, NULL, 'active', "
            "0, :position, '2026-11-01T10:00:00.000000Z', '{}')"),
            {"id": pack_id, "task": task, "sha": pack_id + "0" * 52, "position": position})
        connection.execute(text("INSERT INTO tasks (base_id, name, explicit) VALUES (1, :task, 0)"), {"task": task})
        connection.execute(text(
            "INSERT INTO events (base_id, kind, pack_id, task, detail, actor, at) VALUES "
            "(1, 'add', :id, :task, '{}', 'maker', '2026-11-01T10:00:00.000000Z')"), {"id": pack_id, "task": task})
