"""The composition root: wires settings, the event store, executors and adapters into services."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from botocore.exceptions import ConnectionClosedError, ReadTimeoutError
from botocore.exceptions import ConnectionError as S3ConnectionError
from psycopg_pool import ConnectionPool

from adapters.api.consistency import LastWrites
from adapters.keyring import PgKeyring
from adapters.keyring import ensure_schema as ensure_keyring_schema
from adapters.loop_pg import LoopConnections
from adapters.objects import S3ObjectStore
from adapters.pg_streams import insert_in_one_round_trip, pg_stream_loader, pg_stream_versions
from adapters.s3_listing import S3Listing
from adapters.settings import CONNECTION_TARGET, Settings, SettingsError
from adapters.system import RandomIds, SystemClock
from application.device_keys import HmacDeviceKeyer
from application.executors import ANSWER_WITHIN_S, DirectExecutor, GroupCommitter
from application.services import PaletteApplication, PaletteService
from domain.contracts import topics
from infra.s3 import s3_client
from infra.stack import EmbeddedStack, local_url
from projections.schema import ensure_schema

if TYPE_CHECKING:
    from adapters.retention import Sweeper

# The S3 client's errors that say the store could not be reached (connect refused or timed out, the
# connection dropped, no answer within the read timeout: a store that takes connections and
# answers nothing): the GPU worker waits them out instead of failing the items in flight.
S3_UNREACHABLE: tuple[type[BaseException], ...] = (S3ConnectionError, ConnectionClosedError, ReadTimeoutError)


EVENT_STORE_OVERFLOW = 4  # connections an event store may open past its pool under load


def event_store_env(settings: Settings, pool_size: int = 8, schema: str = "") -> dict[str, str]:
    """eventsourcing's PostgreSQL settings from PALETTE_DATABASE_URL (``schema`` must exist)."""
    url = urlsplit(settings.effective_database_url)
    env = {
        "PERSISTENCE_MODULE": "adapters.pg_streams:PostgresFactory",
        "POSTGRES_URL_PARAMETERS": json.dumps(url_parameters(settings.effective_database_url)),
        "POSTGRES_DBNAME": url.path.lstrip("/") or "palette",
        "POSTGRES_HOST": url.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": unquote(url.username or "palette"),
        "POSTGRES_PASSWORD": unquote(url.password or ""),
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": str(EVENT_STORE_OVERFLOW),
        "POSTGRES_CONNECT_TIMEOUT": "10",
        # No pre-ping: it costs a round trip per checkout; eventsourcing retries a dropped connection.
        "POSTGRES_PRE_PING": "n",
        "POSTGRES_LOCK_TIMEOUT": "5",
    }
    if schema:
        env["POSTGRES_SCHEMA"] = schema
    if _store_tables_exist(settings, schema or "public"):
        # eventsourcing makes its types with CREATE TYPE and takes the error when they exist:
        # PostgreSQL logs an ERROR for it each time a process opens the store.
        env["CREATE_TABLE"] = "n"
    return env


def url_parameters(url: str) -> dict[str, str]:
    """The URL's libpq parameters beyond its target (``sslmode``, ``sslrootcert``, ``keepalives_idle``,
    ``application_name``, …), which eventsourcing's own settings have no place for
    (``pg_streams.PostgresFactory`` gives them to its pool)."""
    from psycopg.conninfo import conninfo_to_dict

    return {k: str(v) for k, v in conninfo_to_dict(url).items() if k not in CONNECTION_TARGET}


def _store_tables_exist(settings: Settings, schema: str) -> bool:
    """Whether the event store's tables were made: the events' and the snapshots' (eventsourcing
    makes each in one transaction, its functions with it; a store from before snapshots has only
    the first)."""
    import psycopg

    try:
        with psycopg.connect(settings.effective_database_url, connect_timeout=10) as conn:
            row = conn.execute("SELECT to_regclass(format('%%I.%%I', %(s)s::text, %(e)s::text)) IS NOT NULL "
                               "AND to_regclass(format('%%I.%%I', %(s)s::text, %(n)s::text)) IS NOT NULL",
                               {"s": schema, "e": f"{PaletteApplication.name}_events",
                                "n": f"{PaletteApplication.name}_snapshots"}).fetchone()
    except psycopg.Error:
        # Not known: the store is opened as if new, and meets the same refusal in eventsourcing's
        # pool, which says only that no connection came within its timeout (a command wanting
        # PostgreSQL's reason connects first, as cli.connect.event_store does).
        return False
    return row is not None and bool(row[0])


def open_event_store(settings: Settings, pool_size: int = 8, schema: str = "",
                     saves: bool = True) -> PaletteApplication:
    """The event store application. Processes that start together each create the tables if
    missing; concurrent DDL on PostgreSQL's catalog can fail with "tuple concurrently updated",
    a duplicate key in ``pg_type`` or a table or index that "already exists", which a short retry
    settles (the other process has created them by then). ``saves``: False for a reader (the
    CLI's commands, the checkpointer), which then runs no DDL on a store already made."""
    import time

    from eventsourcing.persistence import IntegrityError, InternalError, ProgrammingError

    for attempt in range(5):
        try:
            env = event_store_env(settings, pool_size=pool_size, schema=schema)
            missing = env.get("CREATE_TABLE") != "n"
            env["CREATE_TABLE"] = "n"  # made below, each type once
            app = PaletteApplication(env=env)
            try:
                _refuse_session_defaults(settings)
                if missing:
                    _create_store_tables(app)
                if saves:
                    insert_in_one_round_trip(app)
            except BaseException:
                app.close()
                raise
            return app
        except (InternalError, IntegrityError, ProgrammingError):
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _refuse_session_defaults(settings: Settings) -> None:
    """SettingsError, in one line with its fix, when the role's session defaults would fail every
    read of a time (``adapters.pg_session``: a DBA's own PostgreSQL)."""
    import psycopg

    from adapters.pg_session import refusal

    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        if (why := refusal(conn)) is not None:
            raise SettingsError(why)


def _create_store_tables(app: PaletteApplication) -> None:
    """Make the event store's tables, the events' then the snapshots'. eventsourcing gives both
    recorders one composite type and runs its CREATE TYPE with each, taking "already exists" for
    the second, which PostgreSQL logs as an ERROR (a newcomer's first ``make run`` showed one):
    here a recorder's CREATE TYPE runs only while the type is missing."""
    from eventsourcing.postgres import PostgresAggregateRecorder

    for recorder in (app.recorder, app.snapshots.recorder if app.snapshots else None):
        if not isinstance(recorder, PostgresAggregateRecorder):
            continue
        datastore = recorder.datastore
        with datastore.get_connection() as conn:
            row = conn.execute("SELECT to_regtype(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL AS made",
                               [datastore.schema, recorder.stored_event_type_name]).fetchone()
        if row is not None and row["made"]:
            recorder.sql_create_statements = [
                s for s in recorder.sql_create_statements if "CREATE TYPE" not in s.as_string()]
        recorder.create_table()


@dataclass
class Container:
    """Everything one process needs, built once at start-up."""

    settings: Settings
    app: PaletteApplication
    service: PaletteService
    committer: GroupCommitter | None
    s3: Any
    read_pool: Any
    last_writes: LastWrites
    # The event loop's own connections (users' data keys made for registrations); an async
    # server closes its loop's in its lifespan.
    loop_connections: LoopConnections | None = None

    def close(self) -> None:
        if self.committer is not None:
            self.committer.stop()
        self.read_pool.close()
        self.app.close()
        self.last_writes.close()

    async def close_loop(self) -> None:
        """Close the connections the running event loop holds (an async server's lifespan ends)."""
        if self.loop_connections is not None:
            await self.loop_connections.close()
        if isinstance(self.service.store, S3ObjectStore) and self.service.store.listing is not None:
            await self.service.store.listing.close()


def executor(app: PaletteApplication, kind: Literal["group", "direct"] = "group") -> GroupCommitter | DirectExecutor:
    """The command executor of ``kind`` on ``app``: "group" (group commit, the process's one
    aggregate cache, new events of a batch's streams in one query on PostgreSQL) or "direct" (one
    load-decide-save per command, no cache)."""
    if kind == "direct":
        return DirectExecutor(app, loader=pg_stream_loader(app))
    return GroupCommitter(app, pg_stream_loader(app)).start()


def read_pool(url: str, size: int) -> ConnectionPool:
    """The API's pool for the read models and its own tables: a request waits for a connection
    as long as for the writer's answer (ANSWER_WITHIN_S), then 503 (the library's 30 s was three
    times that, with every connection held by a server that stopped answering), and a new
    connection is given as long to be made."""
    return ConnectionPool(url, min_size=1, max_size=size, timeout=ANSWER_WITHIN_S, open=True,
                          kwargs={"autocommit": True, "connect_timeout": round(ANSWER_WITHIN_S)})


def build(settings: Settings, *, naive: bool = False, pool_size: int = 8) -> Container:
    """``naive`` builds the baseline path: no cache, one save per command."""
    app = open_event_store(settings, pool_size=pool_size)
    s3 = s3_client(settings)
    runs = executor(app, "direct" if naive else "group")
    committer = runs if isinstance(runs, GroupCommitter) else None
    read_models = read_pool(settings.effective_database_url, pool_size)
    with read_models.connection() as conn:
        ensure_schema(conn)
        ensure_keyring_schema(conn)
    # The naive baseline also makes data keys and lists inputs on a worker thread each (its
    # Idempotency-Key claims, callback signatures and event inserts go as the API's do).
    connections = None if naive else LoopConnections(settings.effective_database_url)
    listing = None if naive else S3Listing.from_settings(settings)
    service = PaletteService(
        app, runs, SystemClock(), RandomIds(), store=S3ObjectStore(s3, settings.s3_bucket, listing),
        device_keys=HmacDeviceKeyer(settings.device_key_secret),
        keyring=PgKeyring(read_models, settings.device_key_secret, connections),
        versions=None if naive else pg_stream_versions(app, settings.effective_database_url),
    )
    return Container(settings, app, service, committer, s3, read_models, LastWrites(), connections)


def prepare_schemas(settings: Settings) -> None:
    """Every table, once: the event store's, the read models', the API's and the relay's."""
    import psycopg

    from adapters.api.idempotency import ensure_schema as ensure_api_schema
    from adapters.positions import ensure_schema as ensure_relay_schema
    from adapters.webhooks.store import ensure_schema as ensure_webhooks_schema

    open_event_store(settings, pool_size=1).close()
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        ensure_schema(conn)
        ensure_api_schema(conn)
        ensure_webhooks_schema(conn)
        ensure_keyring_schema(conn)
        ensure_relay_schema(conn)  # before the relay, projector and dispatcher start


def embedded_stack(settings: Settings, echo: IO[str] | None = None) -> EmbeddedStack[Settings]:
    """The embedded stack, handed its topics, the schema step, the command of each process and
    where each answers whether it is alive."""
    return EmbeddedStack(settings, topics=topics.ALL, prepare=lambda: prepare_schemas(settings),
                         app_argv=[sys.executable, "-m", "adapters.cli", "serve"], echo=echo,
                         livez=functools.partial(livez_url, settings))


def livez_url(settings: Settings, process: str) -> str | None:
    """Where ``process`` answers whether it is alive: the API on its own port (from its event
    loop, so a blocked loop does not answer), the others on their metrics port (from a thread of
    their own: a process stopped or frozen whole does not); None without such a port (metrics
    off, the sweeper)."""
    from adapters.observability import port_of

    host, port = (settings.api_host, settings.api_port) if process == "api" else (
        settings.metrics_host, port_of(settings, process))
    return None if port is None else local_url(host, port, "/livez")


def build_sweeper(settings: Settings) -> Sweeper:
    """`palette serve sweeper` and `palette admin sweep`: the sweeper on a container of its own."""
    from adapters.retention import Sweeper

    return Sweeper(settings, build(settings, pool_size=2))


def build_relay(settings: Settings, name: str = "", topic: str = "",
                on_acked: Callable[[list[Any]], None] | None = None) -> Any:
    """The relay, woken by the event store's commits. The live one (``palette.events`` under its
    own position) watches the broker for lost messages; another ``name``/``topic`` (the bench's)
    publishes the same log elsewhere and watches nothing."""
    import psycopg

    from adapters import kafka_io
    from adapters.positions import RELAY_NAME
    from adapters.relay import LossWatch, PgWakeup, Relay, RelayState, install_wakeup
    from adapters.rollover import KafkaLogAdmin, LogRollover
    from infra.kafka_admin import ensure_topics
    from projections.log import events_table
    from projections.models import READ_MODELS
    from projections.store import oldest_needed

    app = open_event_store(settings, pool_size=2)
    url = settings.effective_database_url
    recorder: Any = app.recorder
    with psycopg.connect(url, autocommit=True) as conn:
        install_wakeup(conn, recorder.datastore.schema or "public", recorder.events_table_name)

    def republish_from() -> int:
        """The oldest event some read model has not folded (the dispatcher sweeps by itself);
        the topics are made again first, as the broker may have forgotten them too."""
        ensure_topics(settings.effective_kafka_bootstrap, topics.ALL, settings.kafka_partitions)
        head = (recorder.max_notification_id() or 0) + 1
        with psycopg.connect(url, autocommit=True) as conn:
            oldest = [oldest_needed(conn, m, events_table(recorder)) for m in READ_MODELS.values()]
        return min([head, *(o for o in oldest if o is not None)])

    state = RelayState.connect(url)
    live = (name or RELAY_NAME, topic or topics.EVENTS) == (RELAY_NAME, topics.EVENTS)
    loss = LossWatch(kafka_io.TopicEnds(settings, topics.EVENTS), republish_from, state, RELAY_NAME) if live else None
    rollover = None
    if live and settings.broker_log_batches:
        rollover = LogRollover(KafkaLogAdmin(settings.effective_kafka_bootstrap), topics.EVENTS,
                               settings.kafka_partitions, topics.EVENTS_GROUPS, settings.broker_log_batches,
                               readers=state)
    return Relay(app, kafka_io.LogProducer(settings), state, name=name or RELAY_NAME, topic=topic or topics.EVENTS,
                 on_acked=on_acked, wakeup=PgWakeup(url), loss=loss, lead=state.lead, rollover=rollover)


def build_projector(settings: Settings) -> Any:
    from adapters import kafka_io
    from adapters.catchup_processes import CatchUpProcesses
    from adapters.positions import RELAY_NAME, LossSignal, PgPositions
    from adapters.projector import GROUP, PgReadStore, Projector
    from projections.catchup import CatchUp, fold_models, groups
    from projections.log import LogReader

    app = open_event_store(settings, pool_size=1)
    relay_positions = PgPositions.connect(settings.effective_database_url)
    store = PgReadStore(settings.effective_database_url)
    log_reader = LogReader.of(app)
    # A catch-up folds the first group of read models here, each other in a process of its own.
    parts = groups(settings.projector_catchup_processes) if settings.projector_catchup_events > 0 else []
    catchup = CatchUp(store.conn, log_reader, settings.projector_catchup_events,
                      models=parts[0] if len(parts) > 1 else ())
    if len(parts) > 1:
        beside = CatchUpProcesses(settings, parts[1:],
                                  fold_here=lambda models, head: fold_models(store.conn, log_reader, models, head))
        beside.warm()
        catchup.beside = beside
    return Projector(kafka_io.consumer(settings, GROUP, topics.EVENTS),
                     store,
                     log_reader,
                     published=lambda: relay_positions.get(RELAY_NAME),
                     sweep_every_s=settings.projector_sweep_s,
                     losses=LossSignal(settings.effective_database_url, GROUP),
                     catchup=catchup)


def build_dispatcher(settings: Settings) -> Any:
    from adapters import kafka_io
    from adapters.dispatcher import GROUP, Dispatcher, KafkaTaskQueue
    bootstrap = settings.effective_kafka_bootstrap
    app = open_event_store(settings, pool_size=2)
    from adapters.positions import LossSignal
    from adapters.rollover import KafkaLogAdmin, LogRollover

    rollover = None
    if settings.broker_log_batches and settings.broker_storage == "memory":  # see adapters.dispatcher
        rollover = LogRollover(KafkaLogAdmin(bootstrap), topics.GPU_TASKS, settings.kafka_partitions,
                               (topics.GPU_GROUP,), settings.broker_log_batches)
    return Dispatcher(kafka_io.consumer(settings, GROUP, topics.EVENTS, fetch_max_wait_ms=100),
                      kafka_io.producer(settings), app, settings.effective_database_url,
                      stale_s=settings.dispatch_stale_s, queue=KafkaTaskQueue.connect(bootstrap),
                      losses=LossSignal(settings.effective_database_url, GROUP), rollover=rollover)


def build_webhooks(settings: Settings) -> Any:
    """The webhook consumer with its sender (threads of the same process)."""
    import psycopg

    from adapters import kafka_io
    from adapters.positions import RELAY_NAME, LossSignal, PgPositions
    from adapters.webhooks import store, targets
    from adapters.webhooks.consumer import GROUP, DeliveryRecorder, WebhookConsumer
    from adapters.webhooks.retries import parse_schedule
    from adapters.webhooks.sender import WebhookSender
    from projections.log import LogReader

    url = settings.effective_database_url
    production = settings.env == "production"
    app = open_event_store(settings, pool_size=2)
    conn = psycopg.connect(url, autocommit=True)
    store.ensure_schema(conn)
    relay_positions = PgPositions.connect(url)
    sender = WebhookSender(ConnectionPool(url, min_size=1, max_size=settings.webhook_senders + 1,
                                          kwargs={"autocommit": True}, open=True),
                           targets.client(production), parse_schedule(settings.webhook_retry_schedule),
                           production=production, disable_after=settings.webhook_disable_after,
                           disable_after_s=settings.webhook_disable_after_s, workers=settings.webhook_senders,
                           keep_s=settings.webhook_keep_days * 86400)
    log_reader = LogReader.of(app)
    # A fetch wait of 100 ms, as the dispatcher's: webhooks have no latency goal, and the 20 ms
    # of the latency-bound projector kept this process at 12 % of a core while idle (5 % now).
    return WebhookConsumer(kafka_io.consumer(settings, GROUP, topics.EVENTS, fetch_max_wait_ms=100),
                           DeliveryRecorder(conn, log_reader, app.repository.event_store), sender, log_reader,
                           PgPositions(psycopg.connect(url, autocommit=True), store.POSITIONS, conninfo=url),
                           published=lambda: relay_positions.get(RELAY_NAME),
                           sweep_every_s=settings.projector_sweep_s, losses=LossSignal(url, GROUP))


def compute_threads_for(device: Any) -> int:
    """CPU: one item per core, one torch thread each. CUDA: one feeding thread."""
    import os

    import torch

    if device.type == "cuda":
        return 1
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)
    return cores


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def build_gpu_worker(settings: Settings) -> Any:
    import psycopg

    from adapters import kafka_io
    from gpu_consumer.callbacks import CallbackClient
    from gpu_consumer.pipeline import ImagePipeline, pick_device
    from gpu_consumer.segment import built_in
    from gpu_consumer.worker import GROUP, WINDOW, GpuWorker, StartedItems

    database_url = settings.effective_database_url

    def canceled(job_ids: Sequence[str]) -> set[str]:
        # Skip items of jobs already canceled (read model; a miss only costs wasted work).
        try:
            with psycopg.connect(database_url, autocommit=True, connect_timeout=2) as conn:
                rows = conn.execute("SELECT id::text FROM palette_read.jobs_log WHERE id = ANY(%s::uuid[]) "
                                    "AND status = 'canceled'", [list(job_ids)]).fetchall()
            return {r[0] for r in rows}
        except psycopg.Error:
            return set()

    device = pick_device(settings.device)
    if device.type == "cuda" and not cuda_available():  # else every item would fail, three times each
        raise SettingsError("PALETTE_DEVICE is cuda, but torch finds no CUDA device here; "
                            "set it to auto or cpu to edit on the CPU")
    try:
        segmenter = built_in(settings.segmenter_model or None, settings.segmenter_labels or None)
    except ValueError as e:  # a file that is not there or not one: the operator's setting, one line
        raise SettingsError(f"PALETTE_SEGMENTER_MODEL/_LABELS: {e}") from None
    pipeline = ImagePipeline(s3_client(settings, max_pool=16), settings.s3_bucket, device, segmenter,
                             texture_cache_bytes=settings.texture_cache_bytes)
    callbacks = CallbackClient(settings.api_url, settings.callback_secret)
    return GpuWorker(kafka_io.consumer(settings, GROUP, topics.GPU_TASKS, max_poll_records=WINDOW,
                                     fetch_max_wait_ms=200),
                     kafka_io.producer(settings), pipeline, callbacks, canceled_lookup=canceled,
                     compute_threads=compute_threads_for(device), remember_bytes=settings.worker_remember_bytes,
                     started=StartedItems(settings.data_dir / "gpu-started"), max_records=WINDOW,
                     step_s=settings.gpu_step_s, unreachable=S3_UNREACHABLE)
