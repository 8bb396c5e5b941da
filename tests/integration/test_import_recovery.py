"""An import killed part-way, and the same file imported again: what an import reports as imported stays imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from links.importer import STALE_IMPORT
from plumbing.settings import Settings
from tests.harness import ROOT, db_execute, db_query

pytestmark = pytest.mark.postgres

HEADER = "email,name,amount,currency,description,due_date,number,locale\n"
ROWS = (  # the first two (one numbered, one not) are the first chunk of the killed import
    "ann@example.com,Ann Lee,10.00,eur,Consulting,2030-01-31,R-1,en\n"
    "bob@example.com,Bob Ray,11.00,eur,Consulting,2030-01-31,,en\n"
    "cid@example.com,Cid Moe,12.00,eur,Consulting,2030-01-31,R-2,en\n"
    "dan@example.com,Dan Orr,13.00,eur,Consulting,2030-01-31,,en\n"
    "eve@example.com,Eve Kay,14.00,eur,Consulting,2030-01-31,R-3,en\n"
    "fay@example.com,Fay Lin,15.00,eur,Consulting,2030-01-31,,en\n"
)

# `import_rows` as the CLI runs it, in chunks of two rows; the process ends (as with kill -9) right
# after the first chunk is committed: no undo, no final transaction, the batch stays `writing`.
KILLED_AFTER_FIRST_CHUNK = """
import asyncio, os, sys
from pathlib import Path
from links import importer
from plumbing.settings import Settings
from services import open_services

async def main() -> None:
    settings = Settings.from_env()
    rows, bad = importer.parse_csv(Path(sys.argv[1]).read_text(encoding="utf-8"))
    assert not bad, bad
    async with open_services(settings) as services:
        await importer.import_rows(
            services.sessions, services.readers, settings, rows, actor="clerk-a", source=sys.argv[1], send=True, verified=True,
            report=importer.ImportReport(), chunk_rows=2, progress=lambda n: os._exit(9),
        )

asyncio.run(main())
"""


def killed_import(env: dict[str, str], path: str) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED_AFTER_FIRST_CHUNK, path], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 9, done.stderr


def invoices(settings: Settings) -> list[str]:
    return sorted(n for (n,) in db_query(settings.database_url, "SELECT number FROM invoices"))


def batches(settings: Settings) -> list[str]:
    return sorted(s for (s,) in db_query(settings.database_url, "SELECT status FROM import_batches"))


def time_passes(settings: Settings) -> None:
    """No sign of life from the killed import for longer than STALE_IMPORT."""
    db_execute(
        settings.database_url, "UPDATE import_batches SET heartbeat_at = :old", old=datetime.now(UTC) - STALE_IMPORT - timedelta(minutes=1)
    )


ALL = ["INV-000001", "INV-000002", "INV-000003", "R-1", "R-2", "R-3"]


class TestKilledImportImportedAgain:
    """The reviewer's report: a killed import's invoices were counted as "already imported" by the next
    import of the same file, then deleted when the killed import was undone ten minutes later."""

    def test_importing_again_is_refused_while_the_killed_import_may_be_alive(self, cli, env: dict[str, str], settings: Settings,
                                                                             tmp_path: Path) -> None:  # fmt: skip
        path = tmp_path / "big.csv"
        path.write_text(HEADER + ROWS, encoding="utf-8")
        cli("invoice", "list")  # the database exists
        killed_import(env, str(path))
        assert invoices(settings) == ["INV-000001", "R-1"] and batches(settings) == ["writing"]
        reconciled = cli("reconcile", "--json")
        assert reconciled.code == 0, reconciled.err
        assert reconciled.json()["imports_undone"] == []  # it may be alive: a live import is never undone under its writer
        # The same file again, right away: refused, nothing written, and told why and when to try again.
        again = cli("import", str(path), "--send", "--verified", "--json")
        assert again.code == 1
        error = json.loads(again.err.splitlines()[-1])
        assert error["kind"] == "user"
        assert "2 of these invoices belong to an import that is still being written, or was interrupted" in error["error"]
        assert "clerk-a" in error["error"] and "Nothing was imported" in error["error"]
        assert invoices(settings) == ["INV-000001", "R-1"] and batches(settings) == ["writing"]
        # Ten minutes later the killed import is undone (reconcile, by cron); importing again writes every row.
        time_passes(settings)
        reconciled = cli("reconcile", "--json")
        assert len(reconciled.json()["imports_undone"]) == 1
        assert invoices(settings) == []
        result = cli("import", str(path), "--send", "--verified", "--json")
        assert result.code == 0, result.err
        assert (result.json()["created_invoices"], result.json()["already_imported"]) == (6, 0)
        assert invoices(settings) == ALL  # the killed import's numbers went back: no gap
        assert batches(settings) == ["aborted", "done"]

    def test_the_next_import_after_the_stale_time_writes_the_killed_rows_itself(self, cli, env: dict[str, str], settings: Settings,
                                                                                tmp_path: Path) -> None:  # fmt: skip
        path = tmp_path / "big.csv"
        path.write_text(HEADER + ROWS, encoding="utf-8")
        cli("invoice", "list")
        killed_import(env, str(path))
        time_passes(settings)  # nobody ran reconcile: the next import undoes the killed one
        result = cli("import", str(path), "--send", "--verified", "--json")
        assert result.code == 0, result.err
        report = result.json()
        assert (report["created_invoices"], report["already_imported"], report["emailed"]) == (6, 0, 6)
        assert invoices(settings) == ALL
        # Nothing it reported is undone later: reconcile (and any later import) finds nothing to undo.
        reconciled = cli("reconcile", "--json")
        assert reconciled.code == 0, reconciled.err
        assert reconciled.json()["imports_undone"] == []
        assert invoices(settings) == ALL
        assert batches(settings) == ["aborted", "done"]
        # Each invoice has its one email, released (none held, none of the killed import's left).
        assert db_query(settings.database_url, "SELECT count(*) FROM outbox WHERE kind = 'invoice' AND next_attempt_at < :soon",
                        soon=datetime.now(UTC) + timedelta(days=1)) == [(6,)]  # fmt: skip
        assert db_query(settings.database_url, "SELECT count(*) FROM outbox") == [(6,)]
        again = cli("import", str(path), "--send", "--verified", "--json")
        assert (again.json()["created_invoices"], again.json()["already_imported"]) == (0, 6)


# `import_rows` in chunks of two rows, paused after the first (Ctrl-Z, a frozen machine) for longer than
# STALE_IMPORT: meanwhile another process (reconcile) undoes it as dead; then the writer goes on.
PAUSED_AFTER_FIRST_CHUNK = """
import asyncio, os, subprocess, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from links import importer
from plumbing.settings import Settings
from services import open_services
from tests.harness import db_execute

def paused(n: int) -> None:
    if paused.first:
        paused.first = False
        old = datetime.now(UTC) - importer.STALE_IMPORT - timedelta(minutes=1)
        db_execute(os.environ["DATABASE_URL"], "UPDATE import_batches SET heartbeat_at = :old", old=old)
        undone = subprocess.run([sys.executable, "-m", "links", "reconcile", "--json"], capture_output=True, text=True)
        assert undone.returncode == 0, undone.stderr
paused.first = True

async def main() -> None:
    settings = Settings.from_env()
    rows, bad = importer.parse_csv(Path(sys.argv[1]).read_text(encoding="utf-8"))
    async with open_services(settings) as services:
        try:
            await importer.import_rows(
                services.sessions, services.readers, settings, rows, actor="clerk-a", source=sys.argv[1], send=True, verified=True,
                report=importer.ImportReport(), chunk_rows=2, progress=paused,
            )
        except importer.ImportFailed as exc:
            print(exc)
            sys.exit(1)

asyncio.run(main())
"""


class TestPausedImportUndoneMeanwhile:
    def test_a_writer_undone_while_paused_reports_nothing_imported(self, cli, env: dict[str, str], settings: Settings,
                                                                  tmp_path: Path) -> None:  # fmt: skip
        path = tmp_path / "big.csv"
        path.write_text(HEADER + ROWS, encoding="utf-8")
        cli("invoice", "list")
        done = subprocess.run([sys.executable, "-c", PAUSED_AFTER_FIRST_CHUNK, str(path)], cwd=ROOT, env={**os.environ, **env},
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        # It went on after the pause, found its batch undone, and says so: it never reports the rows imported.
        assert done.returncode == 1, done.stdout + done.stderr
        assert "was undone meanwhile" in done.stdout and "nothing was imported" in done.stdout
        assert invoices(settings) == [] and db_query(settings.database_url, "SELECT count(*) FROM outbox") == [(0,)]
        result = cli("import", str(path), "--send", "--verified", "--json")
        assert (result.json()["created_invoices"], result.json()["already_imported"]) == (6, 0)
        assert invoices(settings) == ALL
