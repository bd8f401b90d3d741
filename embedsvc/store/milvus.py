"""Collections on Milvus (Standalone, Distributed, or Milvus Lite in tests): the store of a stateless tier.

Nothing is kept in the process: every call reads what it needs from Milvus, so any replica serves any
collection, and a collection dropped or re-fitted through one replica is seen by the next call on another.

Layout in the Milvus database:
- `embedsvc_catalogue`, rows keyed so that no two writers ever share one (Milvus has no compare-and-set):
  "incarnation/<uid>" per collection incarnation (owner: the name; config, created time, status claimed,
  live or dropping), "pooling/<uid>" (owner: the name; pooling version and the key of its fitted state),
  and fitted pooling states (NetVLAD codebooks) as immutable base64 chunk rows
  "state/<uid>/<version>-<nonce>/<i>" (owner: the uid). A name resolves to its live incarnation only.
  Rewriting the pooling row is the commit point of a re-fit: readers see the old version and state or the
  new ones, never a mix; a re-fit racing a drop and re-create writes only the dropped incarnation's row.
- Creating: claim (an incarnation row "claimed"), settle against other replicas' claims by Strong reads
  (_settle: never two winners), build `embedsvc_<uid>`, commit (the row turns "live"); losers build nothing
  and get AlreadyExists once the winner is live. Dropping: the row turns "dropping" (the commit point),
  then the collection goes, then the rows. A replica that dies midway leaves a claimed or dropping row,
  finished CLAIM_TTL_S later by sweep() at open (or by a create meeting the claim); sweep() also drops
  collections that no row names.
- `embedsvc_<uid>` per collection incarnation: `id` VARCHAR primary key, `vector` (normalised for cosine;
  the metric is always inner product, as in the local store, so scores are the same numbers),
  `metadata` JSON as given, and `filterable` JSON holding the same values under type-tagged hex keys.
  Filters compile against `filterable` only (milvus_filter.py): the keys in an expression are hex, so no user
  text is ever spliced into one as a key; values are bound as template parameters where the server supports them
  (Milvus >= 2.4) and written as escaped literals on Milvus Lite, which has no templates. The type tags
  keep True apart from 1 and "1" while 1 == 1.0, exactly as the local store's filters do.
- Every read uses consistency level Strong: a search waits until the query nodes have applied every
  write acknowledged before it started, on any replica. Cost: each search waits for the newest
  timestamp to be applied (a few ms to ~200 ms on a busy cluster, Milvus's default tick), where
  Bounded would answer at once from slightly stale data.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import logging
import math
import random
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedsvc.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidInput, NotFound, quoted
from embedsvc.store.indexes import (
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    INDEX_PRESETS,
    hnsw_ef_search,
    pq_subquantizers,
    validate_index_kind,
)
from embedsvc.store.metadata import Condition, Filter, refuse_mistyped, wanted_kinds
from embedsvc.store.milvus_filter import Expression, filterable, templates_supported

# The local back end's error classes (shared types): the same statuses whichever back end serves.
from embedsvc.store.models import (
    DEFAULT_SEARCH,
    MAX_ID_BYTES,
    CollectionConfig,
    CollectionInfo,
    CollectionNotFound,
    DeleteResult,
    Hit,
    Item,
    ItemsNotFound,
    SearchOptions,
    StoredItem,
    UpsertResult,
    check_incarnation,
    prepare_items,
    prepare_queries,
    validate_id,
)

log = logging.getLogger(__name__)

CATALOGUE = "embedsvc_catalogue"
CONSISTENCY = "Strong"
CHUNK_CHARS = 60_000  # under VARCHAR's 65,535-byte limit
WRITE_BATCH = 1000
ID_BATCH = 500
IVF_NLIST = 128
# Catalogue row kinds, and the statuses of an incarnation row.
INCARNATION, POOLING, STATE, LEGACY = "incarnation", "pooling", "state", "collection"
CLAIMED, LIVE, DROPPING = "claimed", "live", "dropping"
# A create that has not committed CREATE_LIMIT_S after its claim gives up (monotonic clock); a claimed or
# dropping row CLAIM_TTL_S old (wall clock) belongs to a replica that died, and is swept with its collection.
# The gap is the clock skew between replicas the protocol tolerates.
CREATE_LIMIT_S, CLAIM_TTL_S = 20.0, 60.0
ORPHAN_AGE_MS = int(CLAIM_TTL_S * 1000)
SETTLE_POLL_S = (0.01, 0.2)  # back-off between catalogue reads while a contested create settles
PHYSICAL = re.compile(r"embedsvc_([0-9a-f]{32})")


def _index_params(preset: str, dim: int) -> tuple[str, dict]:
    """Milvus index type and build parameters for an embedsvc preset."""
    return {
        "flat": ("FLAT", {}),
        "ivf": ("IVF_FLAT", {"nlist": IVF_NLIST}),
        "hnsw": ("HNSW", {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}),
        "ivfpq": ("IVF_PQ", {"nlist": IVF_NLIST, "m": pq_subquantizers(dim), "nbits": 8}),
    }[preset]


def _search_params(preset: str, top_k: int, nprobe: int, ef_search: int, items: int | None) -> dict:
    """`items`: the collection's size as this replica last counted it (None: not counted yet)."""
    if preset in ("ivf", "ivfpq"):
        return {"nprobe": min(IVF_NLIST, nprobe or max(32, IVF_NLIST // 8))}
    if preset == "hnsw":
        return {"ef": max(ef_search or hnsw_ef_search(items), top_k)}
    return {}


# Milvus Lite builds these (its engine has FLAT, IVF_FLAT and HNSW); a Milvus server builds all four.
LITE_PRESETS = ("flat", "ivf", "hnsw")


# -- the store ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """A collection incarnation: its catalogue row, and the pooling state its `pooling/<uid>` row points at."""

    config: CollectionConfig
    created_ms: int
    uid: str
    pooling_version: int = 0
    state_key: str = ""
    state_chunks: int = 0
    status: str = LIVE
    since_ms: int = 0  # when the row took its status (a claim or a drop is abandoned CLAIM_TTL_S after it)

    @property
    def physical(self) -> str:
        return f"embedsvc_{self.uid}"

    def row(self, status: str, since_ms: int) -> dict:
        """The incarnation row in `status`: keyed by the uid, so no other incarnation ever writes it."""
        return {
            "key": f"incarnation/{self.uid}",
            "kind": INCARNATION,
            "owner": self.config.name,
            "doc": {
                "config": self.config.to_json(),
                "created_ms": self.created_ms,
                "uid": self.uid,
                "status": status,
                "since_ms": since_ms,
            },
        }

    def pooling_row(self) -> dict:
        return {
            "key": f"pooling/{self.uid}",
            "kind": POOLING,
            "owner": self.config.name,
            "doc": {
                "uid": self.uid,
                "pooling_version": self.pooling_version,
                "state_key": self.state_key,
                "state_chunks": self.state_chunks,
            },
        }

    @classmethod
    def from_rows(cls, incarnation: dict, pooling: dict | None) -> _Record:
        pooling = pooling or {}
        return cls(
            CollectionConfig.from_json(incarnation["config"]),
            int(incarnation["created_ms"]),
            incarnation["uid"],
            int(pooling.get("pooling_version", 0)),
            pooling.get("state_key", ""),
            int(pooling.get("state_chunks", 0)),
            incarnation.get("status", LIVE),
            int(incarnation.get("since_ms", incarnation["created_ms"])),
        )


def _new_uid(now_ms: int) -> str:
    """32 hex digits: the creation time in ms (12), "0" (where a uuid4, the uid of earlier versions, has "4"),
    then 76 random bits. Claims order by it; sweep() dates collections by it."""
    return f"{now_ms:012x}0{secrets.token_hex(10)[:19]}"


def _uid_age_ms(uid: str, now_ms: int) -> float:
    """How long ago the uid was made (negative if made by a clock ahead of ours); infinite for an earlier
    version's uid, which carries no time."""
    return now_ms - int(uid[:12], 16) if uid[12] == "0" else math.inf


def normalise_uri(uri: str) -> str:
    """`milvus:///path/file.db` -> the Lite file; `milvus://host:port` -> http://host:port; others unchanged."""
    if uri.startswith("milvus://"):
        rest = uri[len("milvus://") :]
        return rest if rest.startswith("/") or rest.endswith(".db") else "http://" + rest
    return uri


class MilvusStore:
    """The VectorStore interface over one Milvus database; holds no state besides the connection."""

    def __init__(
        self,
        uri: str,
        *,
        token: str = "",
        db_name: str = "",
        max_top_k: int = 1000,
        clock: Callable[[], float] = time.time,
    ):
        """`clock`: the wall clock that dates claims and drops (tests set it back to age them)."""
        from pymilvus import MilvusClient

        self.clock = clock
        self.uri = normalise_uri(uri)
        if not self.uri:
            raise InvalidInput("the milvus back end needs milvus_uri (http://host:19530 or a Milvus Lite .db file)")
        self.max_top_k = max_top_k
        self._counted: dict[str, int] = {}  # physical collection -> items at this replica's last count
        kwargs = {"uri": self.uri, "token": token}
        if db_name:
            kwargs["db_name"] = db_name
        try:
            self.client = MilvusClient(**kwargs)
            version = self.client.get_server_version()
        except Exception as exc:  # noqa: BLE001 - pymilvus raises many kinds; one clear line for the user
            raise FailedPrecondition(f"cannot connect to Milvus at {self.uri}: {_first_line(exc)}") from None
        self.lite = str(version).startswith("milvus_lite")
        self.presets = LITE_PRESETS if self.lite else tuple(INDEX_PRESETS)
        self.bind = templates_supported(str(version))  # else escaped literals (Milvus Lite, Milvus < 2.5)
        self._ensure_catalogue()
        self._migrate_legacy_rows()
        self.sweep()

    # -- plumbing -------------------------------------------------------------------------------

    def _ensure_catalogue(self) -> None:
        from pymilvus import DataType, MilvusClient

        if self.client.has_collection(CATALOGUE):  # a first query loads it where it was released
            self._run(
                CATALOGUE, CATALOGUE, lambda: self.client.query(CATALOGUE, filter="", limit=1, output_fields=["key"])
            )
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=1024)
        schema.add_field("kind", DataType.VARCHAR, max_length=32)
        schema.add_field("owner", DataType.VARCHAR, max_length=64)
        schema.add_field("doc", DataType.JSON)
        schema.add_field("chunk", DataType.VARCHAR, max_length=65535)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field; unused
        index = self.client.prepare_index_params()
        index.add_index("v", index_type="FLAT", metric_type="IP")
        try:
            self.client.create_collection(CATALOGUE, schema=schema, index_params=index, consistency_level=CONSISTENCY)
        except Exception:  # another replica created it first
            if not self.client.has_collection(CATALOGUE):
                raise

    def _expr(self) -> Expression:
        return Expression(self.bind)

    def _check_filter_types(self, record: _Record, flt: Filter | None) -> None:
        """Refuses a filter with a condition of a type no stored value of its key has, as the local back end does.
        Asked only when the search found nothing: a hit satisfies every condition, so each condition's key holds a
        value of its type; each check is a query (a scan of the collection's JSON), which most searches are spared."""
        held: dict[tuple[str, ...], bool] = {}
        for condition in flt.must if flt is not None else ():
            self._check_types(record, condition, held)

    def _check_types(self, record: _Record, condition: Condition, held: dict[tuple[str, ...], bool]) -> None:
        """As the local back end: a condition whose type no stored value of its key has is InvalidInput. Each
        question is one query (a scan of every item's JSON: on a Milvus server each also waits for Strong
        consistency), so kinds are asked together: the wanted ones, then the others (nothing held: a key no item
        holds, left to the engine's missing-key message), and one by one only to word a refusal. `held` keeps each
        answer for the search's other conditions (`n>2 n<5` asks about n once)."""
        hex_key = condition.key.encode("utf-8").hex()

        def holds(kinds: set[str]) -> bool:
            tagged = tuple(kind + hex_key for kind in sorted(kinds))
            if tagged not in held:
                held[tagged] = self._holds(record, tagged)
            return held[tagged]

        wanted = wanted_kinds(condition)
        others = {"b", "n", "s"} - wanted
        if holds(wanted) or not others or not holds(others):
            return
        refuse_mistyped(condition, {kind for kind in others if holds({kind})})  # one other: answered above

    def _holds(self, record: _Record, tagged_keys: Sequence[str]) -> bool:
        """Whether any live item has a value under one of these `filterable` keys (type tag + hex key)."""
        expression = " or ".join(f'(exists filterable["{key}"])' for key in tagged_keys)  # Milvus 2.3 needs the ()
        return bool(
            self._run(
                record.physical,
                record.config.name,
                lambda: self.client.query(
                    record.physical, filter=expression, output_fields=["id"], limit=1, consistency_level=CONSISTENCY
                ),
            )
        )

    def missing_keys(self, name: str, keys: Sequence[str]) -> list[str]:
        """The keys no live item holds, in the order given (one query per key: asked only when a filter matched
        nothing)."""
        record = self._record(name)
        return [
            key
            for key in keys
            if not self._holds(record, [kind + key.encode("utf-8").hex() for kind in ("b", "n", "s")])
        ]

    def _query(self, collection: str, expr: Expression, flt: str, fields: list[str], name: str = ""):
        kwargs: dict[str, Any] = {"filter": flt, "output_fields": fields, "consistency_level": CONSISTENCY}
        if expr.params:
            kwargs["filter_params"] = expr.params
        return self._run(collection, name or collection, lambda: self.client.query(collection, **kwargs))

    def _run(self, physical: str, name: str, call):
        """Runs a call on one Milvus collection: loads it if it was released (e.g. Milvus Lite reopened in a
        new process), and maps a collection dropped meanwhile (by any replica) to CollectionNotFound."""
        for attempt in (0, 1):
            try:
                return call()
            except NotFound:
                raise
            except Exception as exc:  # pymilvus reports both as MilvusException with a message
                text = str(exc).lower()
                if attempt == 0 and ("released" in text or "not loaded" in text or "load()" in text):
                    self.client.load_collection(physical)
                    continue
                if "not found" in text or "not exist" in text or "can't find" in text:
                    raise _not_found(name) from None
                raise

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _rows(self, flt: str, expr: Expression, fields: Sequence[str] = ("key", "kind", "doc")) -> list[dict]:
        return self._query(CATALOGUE, expr, flt, list(fields))

    def _named(self, name: str) -> tuple[list[_Record], _Record | None]:
        """Every incarnation row of `name` (any status), and the live one with its pooling state, if any."""
        expr = self._expr()
        rows = self._rows(f"owner == {expr.value(name)} and kind in {expr.value([INCARNATION, POOLING])}", expr)
        return _resolve(rows).get(name, ([], None))

    def _record(self, name: str) -> _Record:
        live = self._named(name)[1]
        if live is None:
            raise _not_found(name)
        return live

    def _write_catalogue(self, rows: list[dict]) -> None:
        for row in rows:
            row.setdefault("chunk", "")
            row.setdefault("owner", "")
            row["v"] = [1.0, 0.0]
        self.client.upsert(CATALOGUE, rows)

    def _delete_catalogue(self, flt: str, expr: Expression) -> None:
        self.client.delete(CATALOGUE, filter=flt, **({"filter_params": expr.params} if expr.params else {}))

    def _delete_keys(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), ID_BATCH):
            expr = self._expr()
            self._delete_catalogue(f"key in {expr.value(list(keys[start : start + ID_BATCH]))}", expr)

    def _drop_physical(self, physical: str) -> None:
        try:
            self.client.drop_collection(physical)
        except Exception:  # a Milvus that refuses to drop a missing collection: gone is gone
            if self.client.has_collection(physical):
                raise

    def _purge(self, uid: str) -> None:
        """Removes an incarnation: its Milvus collection first, its incarnation row last, so a collection
        never outlives every row that names it (a crash in between leaves a row for sweep() to finish)."""
        self._drop_physical(f"embedsvc_{uid}")
        expr = self._expr()
        self._delete_catalogue(f"owner == {expr.value(uid)} and kind == {expr.value(STATE)}", expr)
        self._delete_keys([f"pooling/{uid}", f"incarnation/{uid}"])

    def _count(self, record: _Record) -> int:
        rows = self._query(record.physical, self._expr(), "", ["count(*)"], record.config.name)
        count = self._counted[record.physical] = int(rows[0]["count(*)"])  # HNSW's efSearch grows with it
        return count

    def _existing(self, record: _Record, ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), ID_BATCH):
            expr = self._expr()
            flt = expr.ids(ids[start : start + ID_BATCH])
            found.update(row["id"] for row in self._query(record.physical, expr, flt, ["id"], record.config.name))
        return found

    def _info(self, record: _Record) -> CollectionInfo:
        kind, params = _index_params(record.config.index, record.config.dim)
        factory = f"milvus:{kind}" + (f"({','.join(f'{k}={v}' for k, v in params.items())})" if params else "")
        return CollectionInfo(
            record.config, self._count(record), record.created_ms, record.pooling_version, True, factory, record.uid
        )

    # -- collections ----------------------------------------------------------------------------

    def create_collection(self, config: CollectionConfig) -> CollectionInfo:
        """Claims the name in the catalogue, settles the claim against other replicas' (see _settle), then
        builds the Milvus collection and commits by turning the claim live: a name resolves only to a live
        incarnation, so nothing is written into one that loses, and a loser builds nothing."""
        validate_index_kind(config.index, config.dim, config.metric)  # the local store's InvalidInput cases
        if config.index not in self.presets:
            what = "Milvus Lite" if self.lite else "the milvus back end"
            raise FailedPrecondition(
                f"index {quoted(config.index)} cannot be built by {what} at {self.uri}; it "
                f"supports the presets {', '.join(self.presets)}"
            )
        started = time.monotonic()
        while True:
            claimed = time.monotonic()
            claim = self._claim(config)
            try:
                won = self._settle(claim, started)
            except BaseException:
                self._delete_keys([f"incarnation/{claim.uid}"])
                raise
            if won:
                break
        try:
            self._build(claim)
            self._commit(claim, claimed)
        except BaseException:
            self._purge(claim.uid)
            raise
        return self._info(claim)

    def _claim(self, config: CollectionConfig) -> _Record:
        """Writes a claim row for a new incarnation of the name, unless a live one exists."""
        if self._named(config.name)[1] is not None:
            raise _exists(config.name)
        now = self._now_ms()
        claim = _Record(config, now, _new_uid(now), status=CLAIMED, since_ms=now)
        self._write_catalogue([claim.row(CLAIMED, now)])
        return claim

    def _settle(self, claim: _Record, started: float) -> bool:
        """True once the claim has won; False when it yielded to earlier claims that then vanished without
        committing (claim again); AlreadyExists once another incarnation of the name is live.

        Milvus has no compare-and-set, so this uses what Strong reads give: a read sees every write acknowledged
        before it began. A claim wins on a read (after writing it) that finds no other claim. Of two claimants,
        the one whose read missed the other's claim read before that claim was written, so the other's read sees
        it: never two winners. Two that see each other: the later uid withdraws, the earlier waits for that."""
        name, yielded, delay = claim.config.name, False, SETTLE_POLL_S[0]
        while True:
            records, live = self._named(name)
            if live is not None:
                raise _exists(name)
            claims = [r for r in self._claims(records) if r.uid != claim.uid]
            rivals = [r.uid for r in claims]
            if not yielded:
                if claim.uid not in {r.uid for r in records if r.status == CLAIMED}:
                    raise Aborted(
                        f"the claim to create collection {quoted(name)} was taken for abandoned (this "
                        f"replica stalled or its clock is off by over "
                        f"{CLAIM_TTL_S - CREATE_LIMIT_S:.0f} s); retry"
                    )
                if not rivals:
                    return True
                if min(rivals) < claim.uid:
                    self._delete_keys([f"incarnation/{claim.uid}"])
                    yielded = True
            elif all(rival > claim.uid for rival in rivals):  # every earlier claim vanished uncommitted
                return False
            if time.monotonic() - started > CREATE_LIMIT_S:
                raise self._unsettled(name, claims)
            time.sleep(random.uniform(delay / 2, delay))
            delay = min(2 * delay, SETTLE_POLL_S[1])

    def _unsettled(self, name: str, claims: list[_Record]) -> Aborted:
        """ABORTED for a contest that outlasted CREATE_LIMIT_S, saying when the oldest claim in the way is taken
        for abandoned (a replica that died between claim and commit blocks the name until then)."""
        head = f"another replica's creation of collection {quoted(name)} has not settled in {CREATE_LIMIT_S:.0f} s"
        if not claims:
            return Aborted(f"{head}; retry")
        age_s = max(0.0, (self._now_ms() - min(r.since_ms for r in claims)) / 1000)
        return Aborted(
            f"{head}: it was claimed {age_s:.0f} s ago; if that replica died, its claim is cleared "
            f"{CLAIM_TTL_S:.0f} s after it was made: retry in {max(1.0, CLAIM_TTL_S - age_s):.0f} s"
        )

    def _claims(self, records: list[_Record]) -> list[_Record]:
        """The current claims among a name's rows; claims CLAIM_TTL_S old are of replicas that died: swept."""
        now, current = self._now_ms(), []
        for record in records:
            if record.status != CLAIMED:
                continue
            if now - record.since_ms > CLAIM_TTL_S * 1000:
                log.warning(
                    "sweeping an abandoned claim on collection %r (uid %s, %.0f s old)",
                    record.config.name,
                    record.uid,
                    (now - record.since_ms) / 1000,
                )
                self._purge(record.uid)
            else:
                current.append(record)
        return current

    def _build(self, record: _Record) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=record.config.dim)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("filterable", DataType.JSON)
        kind, params = _index_params(record.config.index, record.config.dim)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type=kind, metric_type="IP", params=params)
        self.client.create_collection(record.physical, schema=schema, index_params=index, consistency_level=CONSISTENCY)

    def _commit(self, claim: _Record, claimed: float) -> None:
        """Turns the won claim live, unless it is so old (`claimed`: when it was written, monotonic) that
        others may have taken it for abandoned."""
        name = claim.config.name
        records, live = self._named(name)
        if live is not None:  # only if clocks disagree by more than the protocol tolerates
            raise _exists(name)
        if time.monotonic() - claimed > CREATE_LIMIT_S or claim.uid not in {r.uid for r in records}:
            raise Aborted(
                f"creating collection {quoted(name)} took over {CREATE_LIMIT_S:.0f} s; nothing was created, retry"
            )
        self._write_catalogue([claim.row(LIVE, self._now_ms())])

    def get_collection(self, name: str) -> CollectionInfo:
        return self._info(self._record(name))

    def list_collections(self) -> list[CollectionInfo]:
        expr = self._expr()
        rows = self._rows(f"kind in {expr.value([INCARNATION, POOLING])}", expr)
        records = sorted((live for _, live in _resolve(rows).values() if live is not None), key=lambda r: r.config.name)
        infos = []
        for record in records:
            try:
                infos.append(self._info(record))
            except CollectionNotFound:
                self._lost(record)  # not listed: dropped since the catalogue was read, or lost (logged)
        return infos

    def _lost(self, record: _Record) -> bool:
        """Called when a live record's Milvus collection was not found: False if the name no longer resolves to
        it (dropped, by any replica, since it was read); True, logged, if its row is still live though its
        collection is gone (dropped outside embedsvc, or clocks that disagreed beyond what creation tolerates):
        drop_collection frees such a name."""
        live = self._named(record.config.name)[1]
        if live is None or live.uid != record.uid:
            return False
        log.error(
            "collection %r is live in %s but its Milvus collection %s is gone: drop the collection to free the name",
            record.config.name,
            CATALOGUE,
            record.physical,
        )
        return True

    def drop_collection(self, name: str) -> int:
        """Marks the incarnation dropping (from then on no replica resolves the name to it), then purges it."""
        record = self._record(name)
        try:
            count = self._count(record)
        except CollectionNotFound:
            if not self._lost(record):
                raise
            count = 0
        self._write_catalogue([record.row(DROPPING, self._now_ms())])
        self._purge(record.uid)
        return count

    def set_pooling_state(self, name: str, state: bytes, require_empty: bool = True, uid: str | None = None) -> int:
        """Writes the state as new immutable rows, then commits by rewriting the incarnation's pooling row
        (keyed by its uid: a re-fit racing a drop and re-create never touches the new incarnation)."""
        record = self._record(name)
        check_incarnation(name, record.uid, uid)
        count = self._count(record)
        if require_empty and count:
            raise FailedPrecondition(
                f"collection {quoted(name)} holds {count} items embedded with the current pooling "
                f"state; fit a new collection (or drop and recreate it)"
            )
        version = record.pooling_version + 1
        state_key = f"state/{record.uid}/{version}-{uuid.uuid4().hex[:8]}"
        text = base64.b64encode(state).decode("ascii")
        chunks = [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)] or [""]
        self._write_catalogue(
            [
                {"key": f"{state_key}/{i}", "kind": STATE, "owner": record.uid, "doc": {}, "chunk": chunk}
                for i, chunk in enumerate(chunks)
            ]
        )
        committed = dataclasses.replace(record, pooling_version=version, state_key=state_key, state_chunks=len(chunks))
        self._write_catalogue([committed.pooling_row()])
        return version

    def pooling_state(self, name: str) -> bytes | None:
        record = self._record(name)
        if not record.state_key:
            return None
        expr = self._expr()
        keys = [f"{record.state_key}/{i}" for i in range(record.state_chunks)]
        rows = {
            r["key"]: r["chunk"] for r in self._query(CATALOGUE, expr, f"key in {expr.value(keys)}", ["key", "chunk"])
        }
        return base64.b64decode("".join(rows[k] for k in keys))

    def index_size_bytes(self, name: str) -> int:
        """An estimate from the index type (Milvus does not report index sizes to clients)."""
        record = self._record(name)
        dim, preset = record.config.dim, record.config.index
        per_vector = {
            "flat": 4 * dim,
            "ivf": 4 * dim + 8,
            "hnsw": 4 * dim + 8 * HNSW_M,
            "ivfpq": pq_subquantizers(dim) + 8,
        }[preset]
        return self._count(record) * per_vector

    # -- items ----------------------------------------------------------------------------------

    def upsert(
        self,
        name: str,
        items: Sequence[Item],
        *,
        insert_only: bool = False,
        pooling_version: int | None = None,
        uid: str | None = None,
        thumbnails: dict[str, tuple[str, bytes]] | None = None,
    ) -> UpsertResult:
        """Inserts or replaces items; acknowledged once Milvus has logged the write. Thumbnails are kept by
        the local back end only (Milvus holds vectors and metadata): a `uri` metadata field serves the page."""
        record = self._record(name)
        check_incarnation(name, record.uid, uid)
        self._check_version(name, record, pooling_version)
        if not items:
            return UpsertResult(0, 0, self._count(record))
        ids, vectors, metadata = prepare_items(name, record.config, items)
        existing = self._existing(record, ids)
        if insert_only and existing:
            first = next(i for i in ids if i in existing)
            raise AlreadyExists(
                f"{len(existing)} id(s) already exist in {quoted(name)}, e.g. {quoted(first)}; "
                f"use upsert to replace them"
            )
        rows = [
            {"id": i, "vector": v.tolist(), "metadata": m, "filterable": filterable(m)}
            for i, v, m in zip(ids, vectors, metadata)
        ]
        for start in range(0, len(rows), WRITE_BATCH):
            self._run(
                record.physical,
                name,
                functools.partial(self.client.upsert, record.physical, rows[start : start + WRITE_BATCH]),
            )
        if pooling_version is not None:  # a re-fit that committed while we wrote: take the batch back
            try:
                self._check_version(name, self._record(name), pooling_version)
            except Aborted:
                self._delete_ids(record, [i for i in ids if i not in existing])
                raise
        return UpsertResult(len(ids) - len(existing), len(existing), self._count(record))

    @staticmethod
    def _check_version(name: str, record: _Record, pooling_version: int | None) -> None:
        if pooling_version is not None and pooling_version != record.pooling_version:
            raise Aborted(
                f"collection {quoted(name)} was re-fitted (pooling version {record.pooling_version}, these "
                f"vectors were pooled with {pooling_version}); retry the request"
            )

    def _delete_ids(self, record: _Record, ids: list[str]) -> None:
        for start in range(0, len(ids), ID_BATCH):
            expr = self._expr()
            kwargs: dict[str, Any] = {"filter": expr.ids(ids[start : start + ID_BATCH])}
            if expr.params:
                kwargs["filter_params"] = expr.params
            self._run(
                record.physical, record.config.name, functools.partial(self.client.delete, record.physical, **kwargs)
            )

    def delete(self, name: str, ids: Iterable[str], *, strict: bool = False) -> DeleteResult:
        record = self._record(name)
        ids = list(dict.fromkeys(validate_id(i) for i in ids))
        existing = self._existing(record, ids)
        missing = [i for i in ids if i not in existing]
        if strict and missing:
            raise ItemsNotFound(
                f"{len(missing)} id(s) not in {quoted(name)}, e.g. {quoted(missing[0])}; nothing was deleted"
            )
        self._delete_ids(record, [i for i in ids if i in existing])
        return DeleteResult(len(existing), missing)

    def get(self, name: str, ids: Iterable[str], include_vectors: bool = False) -> tuple[list[StoredItem], list[str]]:
        record = self._record(name)
        ids = [validate_id(i) for i in ids]
        fields = ["id", "metadata"] + (["vector"] if include_vectors else [])
        rows: dict[str, Any] = {}
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), ID_BATCH):
            expr = self._expr()
            flt = expr.ids(unique[start : start + ID_BATCH])
            rows.update((r["id"], r) for r in self._query(record.physical, expr, flt, fields, name))
        found = [
            StoredItem(
                i,
                dict(rows[i]["metadata"] or {}),
                np.asarray(rows[i]["vector"], dtype=np.float32) if include_vectors else None,
            )
            for i in ids
            if i in rows
        ]
        return found, [i for i in ids if i not in rows]

    def thumbnail(self, name: str, item_id: str) -> tuple[str, bytes]:
        self._record(name)
        raise ItemsNotFound(
            f"item {quoted(item_id)} of {quoted(name)} has no thumbnail: the milvus back end keeps "
            f"none; give items a `uri` metadata field for the search page"
        )

    def vector_of(self, name: str, item_id: str) -> np.ndarray:
        items, missing = self.get(name, [item_id], include_vectors=True)
        if missing:
            raise ItemsNotFound(f"item {quoted(item_id)} is not in collection {quoted(name)}")
        assert items[0].vector is not None  # include_vectors
        return items[0].vector

    # -- search ---------------------------------------------------------------------------------

    def search(
        self,
        name: str,
        queries: np.ndarray,
        options: SearchOptions = DEFAULT_SEARCH,
        exclude_ids: Sequence[str | None] | None = None,
    ) -> list[list[Hit]]:
        """Top-k per query; `exclude_ids[i]` drops one id from query i's results ("more like this")."""
        record = self._record(name)
        queries = prepare_queries(record.config, queries, options, self.max_top_k)
        top_k, flt = options.top_k, options.filter
        include_metadata, include_vectors = options.include_metadata, options.include_vectors
        expr = self._expr()
        expression = expr.filter(flt)
        if expression is None or not len(queries):  # matches nothing, or nothing asked (pymilvus fails on no data)
            self._check_filter_types(record, flt)
            return [[] for _ in range(len(queries))]
        k = top_k + (1 if exclude_ids is not None and any(exclude_ids) else 0)
        fields = (["metadata"] if include_metadata else []) + (["vector"] if include_vectors else [])
        kwargs = {
            "data": queries.tolist(),
            "anns_field": "vector",
            "limit": k,
            "output_fields": fields,
            "search_params": {
                "metric_type": "IP",
                "params": _search_params(
                    record.config.index, k, options.nprobe, options.ef_search, self._counted.get(record.physical)
                ),
            },
            "consistency_level": CONSISTENCY,
        }
        if expression:
            kwargs["filter"] = expression
        if expr.params:
            kwargs["filter_params"] = expr.params
        found = self._run(record.physical, name, lambda: self.client.search(record.physical, **kwargs))
        if not any(len(rows) for rows in found):
            self._check_filter_types(record, flt)
        results = []
        for q, rows in enumerate(found):
            skip = exclude_ids[q] if exclude_ids is not None else None
            hits = []
            for row in rows:
                if row["id"] == skip:
                    continue
                entity = row.get("entity", {})
                hits.append(
                    Hit(
                        row["id"],
                        float(row["distance"]),
                        dict(entity.get("metadata") or {}) if include_metadata else None,
                        np.asarray(entity["vector"], dtype=np.float32) if include_vectors else None,
                    )
                )
            results.append(hits[:top_k])
        return results

    # -- lifecycle ------------------------------------------------------------------------------

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Milvus holds the collections: nothing loads in this process."""
        return True

    def checkpoint(self, name: str | None = None) -> None:
        """Seals what was written into indexed segments (Milvus flush). Durability does not depend on it:
        Milvus logs every acknowledged write; unsealed data is searched without its index until Milvus seals it."""
        if name:
            record = self._record(name)
            self._run(record.physical, name, lambda: self.client.flush(record.physical))
            return
        expr = self._expr()
        for _, entry in _resolve(self._rows(f"kind in {expr.value([INCARNATION, POOLING])}", expr)).values():
            if entry is None:
                continue
            with contextlib.suppress(CollectionNotFound):  # dropped since the catalogue was read: nothing to seal
                self._run(entry.physical, entry.config.name, functools.partial(self.client.flush, entry.physical))

    def sweep(self) -> None:
        """Finishes what replicas that died left: claims and drops CLAIM_TTL_S old (their collection, then
        their rows); drops Milvus collections, and deletes pooling and state rows, that no incarnation row
        names. Each create writes its claim before its collection, so a collection without a row is no create
        in progress (earlier versions' losers of a create race are such collections); the uid's age is a second
        guard: what was made a moment ago is left to its maker."""
        now = self._now_ms()
        physical = {m.group(1) for n in self.client.list_collections() if (m := PHYSICAL.fullmatch(n))}
        expr = self._expr()
        extras = self._rows(f"kind in {expr.value([POOLING, STATE])}", expr, ("key", "kind", "owner", "doc"))
        expr = self._expr()  # read after the collections and extras: whatever they hold was named by then
        records = [_Record.from_rows(r["doc"], None) for r in self._rows(f"kind == {expr.value(INCARNATION)}", expr)]
        abandoned = [r for r in records if r.status != LIVE and now - r.since_ms > CLAIM_TTL_S * 1000]
        for record in abandoned:
            self._purge(record.uid)
        known = {r.uid for r in records}
        orphans = sorted(uid for uid in physical - known if _uid_age_ms(uid, now) > ORPHAN_AGE_MS)
        for uid in orphans:
            self._drop_physical(f"embedsvc_{uid}")
        stray = [
            r["key"]
            for r in extras
            if (uid := r["doc"]["uid"] if r["kind"] == POOLING else r["owner"]) not in known
            and _uid_age_ms(uid, now) > ORPHAN_AGE_MS
        ]
        self._delete_keys(stray)
        if abandoned or orphans or stray:
            log.warning(
                "swept %d abandoned creates or drops, %d Milvus collections no catalogue row named and "
                "%d stray catalogue rows",
                len(abandoned),
                len(orphans),
                len(stray),
            )

    def _migrate_legacy_rows(self) -> None:
        """Catalogues of earlier versions keep one row per name, "collection/<name>", which a drop or re-fit
        racing a re-create could overwrite; each becomes a live incarnation row and a pooling row."""
        expr = self._expr()
        rows = self._rows(f"kind == {expr.value(LEGACY)}", expr)
        for row in rows:
            record = _Record.from_rows(row["doc"], row["doc"])  # the old row holds both halves
            self._write_catalogue([record.row(LIVE, record.created_ms), record.pooling_row()])
            self._delete_keys([row["key"]])
        if rows:
            log.info("moved %d collection rows of %s to per-incarnation rows", len(rows), CATALOGUE)

    def close(self) -> None:
        self.client.close()


def _resolve(rows: list[dict]) -> dict[str, tuple[list[_Record], _Record | None]]:
    """Catalogue rows by collection name: every incarnation row, and the live one with its pooling state."""
    pooling = {r["doc"]["uid"]: r["doc"] for r in rows if r["kind"] == POOLING}
    named: dict[str, list[_Record]] = {}
    for row in rows:
        if row["kind"] == INCARNATION:
            record = _Record.from_rows(row["doc"], pooling.get(row["doc"]["uid"]))
            named.setdefault(record.config.name, []).append(record)
    resolved = {}
    for name, records in named.items():
        live = sorted((r for r in records if r.status == LIVE), key=lambda r: r.uid)
        if len(live) > 1:  # only if replicas' clocks disagree by more than the create protocol tolerates
            log.error(
                "collection %r has %d live incarnations (%s); every replica serves the earliest",
                name,
                len(live),
                ", ".join(r.uid for r in live),
            )
        resolved[name] = (records, live[0] if live else None)
    return resolved


def _exists(name: str) -> AlreadyExists:
    return AlreadyExists(f"collection {quoted(name)} already exists; drop it first or pick another name")


def _not_found(name: str) -> NotFound:
    return CollectionNotFound(f"collection {quoted(name)} does not exist; ListCollections shows those that do")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
