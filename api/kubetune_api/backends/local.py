"""Jobs in an embedded SQLite database (local mode).

One row per job holding the whole manifest as JSON, plus the columns queries need. SQLite's
unique index on (org, idempotency_key) makes idempotent creation atomic.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
from pathlib import Path

from kubetune.base_models import RegisteredBaseModel
from kubetune.finetunejob import FineTuneJob, FineTuneJobStatus
from kubetune.lifecycle import TERMINAL_PHASES
from kubetune_api.backends.base import JobBackend, JobPage, OrgUsage, same_request
from kubetune_api.errors import job_not_found

# The database's file in local mode's data folder.
JOBS_DATABASE = "jobs.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    idempotency_key TEXT,
    phase TEXT,
    manifest TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_org_id ON jobs (org, id);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (org, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS base_models (
    org TEXT NOT NULL,
    id TEXT NOT NULL,
    model TEXT NOT NULL,
    PRIMARY KEY (org, id)
);
"""


class LocalJobBackend(JobBackend):
    """SQLite-backed job store; safe to share between threads."""

    merges_models = True  # local mode's job loop runs kubetune_trainer.merge
    registers_base_models = True  # and checks the base models registered here

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def _row_to_job(self, manifest: str) -> FineTuneJob:
        return FineTuneJob.model_validate_json(manifest)

    def _save(self, job: FineTuneJob) -> None:
        phase = job.status.phase.value if job.status and job.status.phase else None
        self._db.execute(
            "UPDATE jobs SET manifest = ?, phase = ? WHERE id = ?",
            (json.dumps(job.to_manifest()), phase, job.metadata.name),
        )

    def create(self, job: FineTuneJob, idempotency_key: str | None) -> tuple[FineTuneJob, bool]:
        """See :meth:`JobBackend.create`."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO jobs (id, org, idempotency_key, phase, manifest) "
                    "VALUES (?, ?, ?, NULL, ?)",
                    (
                        job.metadata.name,
                        job.spec.org,
                        idempotency_key,
                        json.dumps(job.to_manifest()),
                    ),
                )
            except sqlite3.IntegrityError:
                row = self._db.execute(
                    "SELECT manifest FROM jobs WHERE org = ? AND idempotency_key = ?",
                    (job.spec.org, idempotency_key),
                ).fetchone()
                if row is None:
                    raise
                return same_request(self._row_to_job(row[0]), job), False
        return job, True

    def get(self, org: str, job_id: str) -> FineTuneJob | None:
        """See :meth:`JobBackend.get`."""
        row = self._db.execute(
            "SELECT manifest FROM jobs WHERE org = ? AND id = ?", (org, job_id)
        ).fetchone()
        return self._row_to_job(row[0]) if row else None

    def list(
        self, org: str, *, after: str | None, limit: int, metadata: dict[str, str] | None = None
    ) -> JobPage:
        """See :meth:`JobBackend.list`."""
        query = "SELECT manifest FROM jobs WHERE org = ?"
        args: list[object] = [org]
        if after is not None:
            query += " AND id < ?"
            args.append(after)
        for key, value in (metadata or {}).items():
            query += " AND json_extract(manifest, '$.spec.metadata.' || json_quote(?)) = ?"
            args.extend([key, value])
        query += " ORDER BY id DESC LIMIT ?"
        args.append(limit + 1)
        rows = self._db.execute(query, args).fetchall()
        jobs = [self._row_to_job(r[0]) for r in rows[:limit]]
        return JobPage(jobs=jobs, has_more=len(rows) > limit)

    def scan(self, *, unfinished: bool) -> builtins.list[FineTuneJob]:
        """Every org's jobs, oldest first; only those not yet final when ``unfinished``
        (local mode's job runner works through them; the API's calls stay scoped to an org).
        """
        query = "SELECT manifest FROM jobs"
        args: list[object] = []
        if unfinished:
            terminal = [p.value for p in TERMINAL_PHASES]
            query += f" WHERE phase IS NULL OR phase NOT IN ({','.join('?' * len(terminal))})"
            args.extend(terminal)
        rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [self._row_to_job(r[0]) for r in rows]

    def active_usage(self, org: str) -> OrgUsage:
        """See :meth:`JobBackend.active_usage`."""
        terminal = [p.value for p in TERMINAL_PHASES]
        rows = self._db.execute(
            f"SELECT manifest FROM jobs WHERE org = ? AND (phase IS NULL OR phase NOT IN "  # noqa: S608
            f"({','.join('?' * len(terminal))})) "
            "AND json_extract(manifest, '$.spec.cancel') IS NOT 1",
            (org, *terminal),
        ).fetchall()
        return OrgUsage.of([self._row_to_job(r[0]) for r in rows])

    def _modify(
        self,
        org: str,
        job_id: str,
        *,
        spec: dict[str, bool] | None = None,
        annotations: dict[str, str] | None = None,
        status: FineTuneJobStatus | None = None,
    ) -> FineTuneJob:
        with self._lock:
            job = self.get(org, job_id)
            if job is None:
                raise job_not_found(job_id)
            if spec:
                job.spec = job.spec.model_copy(update=spec)
            if annotations:
                job.metadata.annotations.update(annotations)
            if status is not None:
                job.status = status
            self._save(job)
            return job

    def patch_spec(
        self, org: str, job_id: str, *, cancel: bool | None = None, suspend: bool | None = None
    ) -> FineTuneJob:
        """See :meth:`JobBackend.patch_spec`."""
        update = {k: v for k, v in {"cancel": cancel, "suspend": suspend}.items() if v is not None}
        return self._modify(org, job_id, spec=update)

    def annotate(self, org: str, job_id: str, annotations: dict[str, str]) -> FineTuneJob:
        """See :meth:`JobBackend.annotate`."""
        return self._modify(org, job_id, annotations=annotations)

    def update_status(self, org: str, job_id: str, status: FineTuneJobStatus) -> FineTuneJob:
        """See :meth:`JobBackend.update_status`."""
        return self._modify(org, job_id, status=status)

    def ready(self) -> bool:
        """See :meth:`JobBackend.ready`."""
        self._db.execute("SELECT 1").fetchone()
        return True

    # -- registered base models ------------------------------------------------------------
    def base_models(self, org: str | None = None) -> builtins.list[RegisteredBaseModel]:
        """See :meth:`JobBackend.base_models`."""
        query, args = "SELECT model FROM base_models", []
        if org is not None:
            query, args = query + " WHERE org = ?", [org]
        rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [RegisteredBaseModel.model_validate_json(r[0]) for r in rows]

    def get_base_model(self, org: str, model_id: str) -> RegisteredBaseModel | None:
        """See :meth:`JobBackend.get_base_model`."""
        row = self._db.execute(
            "SELECT model FROM base_models WHERE org = ? AND id = ?", (org, model_id)
        ).fetchone()
        return RegisteredBaseModel.model_validate_json(row[0]) if row else None

    def add_base_model(self, model: RegisteredBaseModel) -> bool:
        """See :meth:`JobBackend.add_base_model`."""
        try:
            self._db.execute(
                "INSERT INTO base_models (org, id, model) VALUES (?, ?, ?)",
                (model.org, model.id, model.model_dump_json()),
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def put_base_model(self, model: RegisteredBaseModel) -> None:
        """See :meth:`JobBackend.put_base_model`."""
        self._db.execute(
            "UPDATE base_models SET model = ? WHERE org = ? AND id = ?",
            (model.model_dump_json(), model.org, model.id),
        )

    def delete_base_model(self, org: str, model_id: str) -> bool:
        """See :meth:`JobBackend.delete_base_model`."""
        cursor = self._db.execute(
            "DELETE FROM base_models WHERE org = ? AND id = ?", (org, model_id)
        )
        return cursor.rowcount > 0
