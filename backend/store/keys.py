"""Every Redis key this backend writes, built here and nowhere else.

With the default prefix `clip-backend` (STORE_PREFIX):

    clip-backend:log                                stream  the annotation event log, in order
    clip-backend:seen                               set     idempotency keys of logged events
    clip-backend:correction:{annotation}            hash    record (JSON), updated_ts, deleted_at
    clip-backend:corrections:{project}              zset    a project's annotation ids by updated_ts
    clip-backend:corrections                        zset    all annotation ids by updated_ts
    clip-backend:task-annotations:{project}:{task}  set     annotation ids of one task
    clip-backend:prediction:{project}:{task}        string  latest issued prediction (JSON)
    clip-backend:predicted-tasks:{project}          set     tasks with an issued prediction
    clip-backend:embedding:{model}|{sha256}         string  image embedding, float16 bytes
    clip-backend:image:{model}|{sha1(ref)}          string  embedding key of the image at a ref
    clip-backend:image-verified:{model}|{sha1(ref)} string  when that was last checked (Unix s)
    clip-backend:heads:{project}                    hash    adapted heads by id (h1, h2, …; JSON)
    clip-backend:head-seq:{project}                 string  the last head number issued
    clip-backend:active-head:{project}              string  the head the project serves
    clip-backend:job:{job}                          hash    pre-label job fields (JSON values)
    clip-backend:jobs:{project}                     set     a project's pre-label job ids
    clip-backend:job-done:{job}                     set     tasks whose prediction LS stored
    clip-backend:job-failed:{job}                   hash    task → why it failed
    clip-backend:job-claims:{job}                   hash    task → "deadline_ms owner"
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "clip-backend"

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def log(self) -> str:
        return self._key("log")

    def seen(self) -> str:
        return self._key("seen")

    def correction(self, annotation: str) -> str:
        return self._key("correction", annotation)

    def corrections(self, project: str) -> str:
        return self._key("corrections", project)

    def corrections_all(self) -> str:
        return self._key("corrections")

    def task_annotations(self, project: str, task: str) -> str:
        return self._key("task-annotations", project, task)

    def prediction(self, project: str, task: str) -> str:
        return self._key("prediction", project, task)

    def predicted_tasks(self, project: str) -> str:
        return self._key("predicted-tasks", project)

    def embedding(self, key: str) -> str:
        return self._key("embedding", key)

    def image(self, key: str) -> str:
        return self._key("image", key)

    def image_verified(self, key: str) -> str:
        return self._key("image-verified", key)

    def heads(self, project: str) -> str:
        return self._key("heads", project)

    def head_seq(self, project: str) -> str:
        return self._key("head-seq", project)

    def active_head(self, project: str) -> str:
        return self._key("active-head", project)

    def job(self, job: str) -> str:
        return self._key("job", job)

    def jobs(self, project: str) -> str:
        return self._key("jobs", project)

    def job_done(self, job: str) -> str:
        return self._key("job-done", job)

    def job_failed(self, job: str) -> str:
        return self._key("job-failed", job)

    def job_claims(self, job: str) -> str:
        return self._key("job-claims", job)
