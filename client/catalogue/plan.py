"""From valid rows to items: one image each, with a deterministic request id and seed, and shards.

An item's request id is `{job}-{row key}-{scene}-{index}` (a hashed scene when the id would pass 64
characters or the scene id has other characters); it is the image's storage key `{request id}/0.png`,
so the stored objects say which items are done. Without a row seed, an item's seed is 32 bits of
sha256(job, row key, scene, index): the same job renders the same images on any machine, in any order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from client.catalogue.spec import Row, row_key
from services.common.ids import ID_PATTERN, is_valid_id

MAX_JOB_ID = 24  # room for "-{key}-{scene}-{index}" inside the 64 characters of a request id


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based): the items whose id hashes to it."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'I/N', 0 <= I < N."""
        i, sep, n = text.partition("/")
        try:
            shard = cls(int(i), int(n))
        except ValueError:
            raise ValueError(f"--shard {text!r}: give I/N, e.g. 0/2") from None
        if not sep or not 0 <= shard.index < shard.count:
            raise ValueError(f"--shard {text!r}: need 0 <= I < N")
        return shard

    def holds(self, request_id: str) -> bool:
        digest = hashlib.sha256(request_id.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class Item:
    """One image of the job: one Generate request with num_images=1."""

    request_id: str
    row: Row
    scene: str
    index: int
    seed: int


def check_job_id(job: str) -> str:
    if not is_valid_id(job) or len(job) > MAX_JOB_ID:
        raise ValueError(
            f"job id {job!r}: use 1-{MAX_JOB_ID} characters of [A-Za-z0-9._-], starting with one of A-Za-z0-9"
        )
    return job


def request_id(job: str, key: str, scene: str, index: int) -> str:
    rid = f"{job}-{key}-{scene}-{index}"
    if len(rid) > 64 or not ID_PATTERN.fullmatch(rid):
        rid = f"{job}-{key}-t{hashlib.sha256(scene.encode()).hexdigest()[:8]}-{index}"
    return rid


def item_seed(job: str, key: str, scene: str, index: int, fixed: int | None) -> int:
    if fixed is not None:
        return fixed + index  # as the generator numbers a request's images: seed + i
    digest = hashlib.sha256(f"{job}/{key}/{scene}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def plan_items(job: str, rows: list[Row], shard: Shard = Shard()) -> list[Item]:
    """Every item of the valid rows, in file order (row, scene, index), within the shard."""
    items = []
    for row in rows:
        key = row_key(row)
        for scene in row.scenes:
            for i in range(row.images):
                rid = request_id(job, key, scene, i)
                if shard.holds(rid):
                    items.append(Item(rid, row, scene, i, item_seed(job, key, scene, i, row.seed)))
    return items
