"""Alerting sensors against a real webhook receiver on 127.0.0.1 and a PostgreSQL store."""

from __future__ import annotations

import dataclasses
import re
import socket
import uuid
from collections.abc import Iterator

import dagster as dg
import pytest

from bitloot_reconcile.adapters.errors import PermanentError, TransientError
from bitloot_reconcile.adapters.webhook import WebhookClient
from bitloot_reconcile.jobs import fulfill_backlog
from bitloot_reconcile.resources.alerts import AlertsResource
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.sensors import alerts as alerts_module
from bitloot_reconcile.sensors.alerts import TAG_ALERT
from bitloot_reconcile.store.repository import Store
from bitloot_reconcile.tags import OUTCOME_REFUSED, TAG_BATCH_SIZE, TAG_OUTCOME
from bitloot_standins.httpserver import Fault
from bitloot_standins.s3_proxy import FaultyS3Proxy
from tests.fixtures.definitions import needs_attention_alert_sensor, order_backlog, run_failure_alert_sensor
from tests.fixtures.webhook import HOOK_PATH, Receiver
from tests.fixtures.world import FRONTEND, World, backlog_config

DAGSTER_URL = "http://dagster.test"


@pytest.fixture
def dead_url() -> str:
    """A loopback URL nobody listens on: the receiver is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{HOOK_PATH}"


def alerts_to(url: str | None) -> AlertsResource:
    return AlertsResource(webhook_url=url, dagster_base_url=DAGSTER_URL, timeout_seconds=2)


@pytest.fixture
def attention(store_engine, store_url, dagster_instance):
    """The needs-attention sensor's tick, and a way to record an order's outcome as a run would."""

    class Attention:
        store = Store(store_engine)

        @staticmethod
        def record(order_id: str, outcome: str, reason: str = "supplier canceled Kinguin order PHS84") -> str:
            run_id = str(uuid.uuid4())
            Attention.store.update_state(order_id, last_outcome=outcome, last_reason=reason, last_run_id=run_id)
            return run_id

        @staticmethod
        def tick(url: str | None) -> dg.SkipReason:
            context = dg.build_sensor_context(
                instance=dagster_instance,
                resources={"store": StoreResource(database_url=store_url), "alerts": alerts_to(url)},
            )
            return needs_attention_alert_sensor(context)

    return Attention


def test_each_order_is_alerted_once_per_state_change(attention, receiver: Receiver):
    stuck, fine, backing_off = (str(uuid.uuid4()) for _ in range(3))
    run_id = attention.record(stuck, "needs_attention")
    attention.record(fine, "fulfilled")
    attention.record(backing_off, "retry_later", "kinguin: 503")

    attention.tick(receiver.hook_url)
    (text,) = receiver.texts
    assert stuck in text and "needs_attention" in text and "supplier canceled Kinguin order PHS84" in text
    assert f"{DAGSTER_URL}/runs/{run_id}" in text
    assert attention.store.get_state(stuck).alerted_outcome == "needs_attention"

    attention.tick(receiver.hook_url)
    attention.record(stuck, "needs_attention")  # a later run ends the same way: same state, no new alert
    attention.tick(receiver.hook_url)
    assert len(receiver.texts) == 1

    attention.record(stuck, "retry_later")  # an admin retry moved it on...
    attention.tick(receiver.hook_url)
    assert len(receiver.texts) == 1
    attention.record(stuck, "needs_attention", "attempts exhausted after 8 attempts")  # ...and back
    attention.tick(receiver.hook_url)
    assert len(receiver.texts) == 2 and "attempts exhausted" in receiver.texts[1]


def test_webhook_down_posts_nothing_marks_nothing_and_the_next_tick_retries(attention, receiver, dead_url):
    orders = [str(uuid.uuid4()) for _ in range(2)]
    for order_id in orders:
        attention.record(order_id, "needs_attention")

    assert "0 of 2" in attention.tick(dead_url).skip_message
    receiver.inject("hook", Fault(status=503))
    assert "0 of 2" in attention.tick(receiver.hook_url).skip_message
    assert receiver.texts == []
    assert all(attention.store.get_state(o).alerted_outcome is None for o in orders)

    assert "2 of 2" in attention.tick(receiver.hook_url).skip_message
    attention.tick(receiver.hook_url)
    assert sorted(o for o in orders for t in receiver.texts if o in t) == sorted(orders)  # once each


def test_without_a_webhook_alerts_are_logged_only(attention):
    order_id = str(uuid.uuid4())
    attention.record(order_id, "needs_attention")
    assert "1 of 1" in attention.tick(None).skip_message
    assert attention.store.get_state(order_id).alerted_outcome == "needs_attention"


def test_failed_run_is_alerted_and_a_lost_alert_is_resent(world: World, r2_refusing, receiver, dead_url,
                                                           monkeypatch):
    monkeypatch.setattr(alerts_module, "RETRY_PENDING_AFTER", alerts_module.RETRY_PENDING_AFTER * 0)
    with dg.instance_for_test() as instance:  # its own run history: pending alerts of other tests stay out
        world = dataclasses.replace(world, instance=instance)

        def failed_run(url: str | None) -> tuple[str, dg.DagsterRun]:
            order_id = world.order([world.product()])
            result = world.run(order_id, r2=r2_refusing)  # R2 refuses the key write: an incident, not a typo
            failure_alert(instance, world, result, url)
            return order_id, result.dagster_run

        def tick() -> None:
            context = dg.build_sensor_context(
                instance=instance,
                resources={
                    "store": StoreResource(database_url=world.store_url),
                    "alerts": alerts_to(receiver.hook_url),
                },
            )
            needs_attention_alert_sensor(context)

        order_id, run = failed_run(receiver.hook_url)
        (text,) = receiver.texts
        assert f"BitLoot order {order_id}: run failed. Cause: store_keys failed: " in text
        assert "Next: next attempt at " in text and f"{DAGSTER_URL}/runs/{run.run_id}" in text
        assert instance.get_run_by_id(run.run_id).tags[TAG_ALERT] == "sent"

        lost_order, lost = failed_run(dead_url)  # the receiver is down when the run fails
        assert len(receiver.texts) == 1
        assert instance.get_run_by_id(lost.run_id).tags[TAG_ALERT] == "pending"
        tick()
        tick()
        assert len(receiver.texts) == 2 and lost.run_id in receiver.texts[1] and lost_order in receiver.texts[1]
        assert "Cause: store_keys failed: " in receiver.texts[1]
        assert instance.get_run_by_id(lost.run_id).tags[TAG_ALERT] == "sent"


# -- the webhook adapter ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault(status=500), TransientError),
        (Fault(status=429, retry_after=7), TransientError),
        (Fault(latency=1.0), TransientError),  # past the client's timeout
        (Fault(status=404, body="no_service"), PermanentError),
        (Fault(status=400, body="invalid_payload"), PermanentError),
    ],
)
def test_webhook_errors_are_classified_and_never_show_the_url(receiver: Receiver, fault: Fault, error: type):
    receiver.inject("hook", fault)
    with WebhookClient(receiver.hook_url, timeout=0.3) as client, pytest.raises(error) as raised:
        client.post({"text": "hello"})
    assert "hook-secret-token" not in str(raised.value) and "hook-secret-token" not in repr(client)
    if fault.retry_after:
        assert raised.value.retry_after == 7


# -- what a failed run's alert says ---------------------------------------------------------------------------
@pytest.fixture
def r2_outage(world: World, seaweed) -> Iterator[tuple[FaultyS3Proxy, R2Resource]]:
    """The world's bucket behind the S3 outage proxy: key writes can be made to fail like an R2 outage."""
    proxy = FaultyS3Proxy(seaweed.endpoint_url).start()
    try:
        yield proxy, R2Resource(endpoint=proxy.url, access_key_id=seaweed.access_key_id,
                                secret_access_key=seaweed.secret_access_key, bucket=world.r2.bucket)
    finally:
        proxy.stop()


def failure_alert(instance: dg.DagsterInstance, world: World, result: dg.ExecuteInProcessResult,
                  url: str) -> None:
    """The run-failure sensor's evaluation for one failed run, as the daemon would do it (the run as stored
    now, tags added after the run started included)."""
    assert not result.success
    context = dg.build_run_status_sensor_context(
        sensor_name=run_failure_alert_sensor.name,
        dagster_instance=instance,
        dagster_run=instance.get_run_by_id(result.run_id),
        dagster_event=result.get_run_failure_event(),
        resources={"alerts": alerts_to(url), "store": StoreResource(database_url=world.store_url)},
    ).for_run_failure()
    run_failure_alert_sensor(context)


def test_an_r2_outage_is_alerted_with_its_cause_and_the_next_attempt(world: World, r2_outage, receiver):
    proxy, r2_via_proxy = r2_outage
    order_id = world.order([world.product()])
    proxy.fail(f"orders/{order_id}/", times=1000)  # every key write of this order answers 503, every retry

    result = world.run(order_id, r2=r2_via_proxy)
    failure_alert(world.instance, world, result, receiver.hook_url)

    (text,) = receiver.texts
    state = world.store.get_state(order_id)
    assert state.last_outcome == "retry_later" and state.next_attempt_at is not None
    assert "Exceeded max_retries" not in text and "Exceeded max_retries" not in state.last_reason
    assert order_id in text and "store_keys" in text
    # What failed, in words: service, operation, status.
    assert re.search(rf"Cause: store_keys failed: TransientError: r2: put_object orders/{order_id}/key-\S+\.txt: "
                     r"503 ServiceUnavailable\.", text), text
    assert f"next attempt at {state.next_attempt_at:%Y-%m-%d %H:%M} UTC" in text
    assert f"{DAGSTER_URL}/runs/{result.run_id}" in text
    assert text.count("://") == 1  # the run link only


@pytest.fixture
def r2_refusing(world: World, seaweed) -> R2Resource:
    """The world's bucket with a wrong secret: every key write is refused (403), with no in-run retries."""
    return R2Resource(endpoint=seaweed.endpoint_url, access_key_id=seaweed.access_key_id,
                      secret_access_key="not-the-secret-key", bucket=world.r2.bucket)


def test_a_run_that_quarantines_its_order_says_so_and_is_alerted_once(world: World, r2_refusing, receiver,
                                                                      attention):
    order_id = world.order([world.product()])
    policy = RecoveryPolicyResource(frontend_url=FRONTEND, supplier_poll_attempts=1, supplier_poll_seconds=0.2,
                             max_attempts=1)  # the first failure uses up the order's attempts

    result = world.run(order_id, r2=r2_refusing, policy=policy)
    failure_alert(world.instance, world, result, receiver.hook_url)

    (text,) = receiver.texts
    state = world.store.get_state(order_id)
    assert state.last_outcome == "needs_attention" and state.last_run_id == result.run_id
    assert re.search(rf"Cause: attempts exhausted after 1 attempts \(last: store_keys failed: PermanentError: "
                     rf"r2: put_object orders/{order_id}/key-\S+\.txt: 403 ", text), text
    assert "Next: quarantined: needs a person." in text and f"/runs/{result.run_id}" in text
    assert "not-the-secret-key" not in text
    # The run's alert told of the quarantine: the needs-attention sensor does not repeat it.
    assert state.alerted_outcome == "needs_attention"
    attention.tick(receiver.hook_url)
    assert len(receiver.texts) == 1


def test_without_the_store_the_alert_still_goes_out_with_the_step_failure(world: World, r2_refusing,
                                                                           receiver):
    order_id = world.order([world.product()])
    result = world.run(order_id, r2=r2_refusing)
    dead_store = StoreResource(database_url="postgresql+psycopg://nobody@127.0.0.1:9/none?connect_timeout=2")
    context = dg.build_run_status_sensor_context(
        sensor_name=run_failure_alert_sensor.name,
        dagster_instance=world.instance,
        dagster_run=result.dagster_run,
        dagster_event=result.get_run_failure_event(),
        resources={"alerts": alerts_to(receiver.hook_url), "store": dead_store},
    ).for_run_failure()
    run_failure_alert_sensor(context)

    (text,) = receiver.texts
    assert re.search(rf"Cause: store_keys failed: PermanentError: r2: put_object orders/{order_id}/key-\S+\.txt: "
                     r"403 SignatureDoesNotMatch: check R2_ACCESS_KEY_ID", text), text
    assert "Next: nothing scheduled: fix the cause, then retry the order." in text


# -- an operator's input error pages nobody -------------------------------------------------------------------
# A malformed request never becomes a run (the launch is refused); one the store refuses fails its run, which
# the ops tag `bitloot/outcome=refused` before the step fails.
def refused_run(world: World, order_id: str, **kwargs) -> dg.ExecuteInProcessResult:
    result = world.run(order_id, **kwargs)
    assert not result.success
    assert world.instance.get_run_by_id(result.run_id).tags[TAG_OUTCOME] == OUTCOME_REFUSED
    return result


@pytest.mark.parametrize("case", ["unknown", "already fulfilled"])
def test_an_input_error_is_logged_not_alerted(world: World, receiver, case: str):
    if case == "unknown":
        order_id = str(uuid.uuid4())
    else:
        order_id = world.order([world.product()], status="fulfilled", completion_email_sent=True)
    result = refused_run(world, order_id)
    failure_alert(world.instance, world, result, receiver.hook_url)

    assert receiver.requests_to("hook") == []
    assert world.instance.get_run_by_id(result.run_id).tags[TAG_ALERT] == "input_error"


def test_a_pending_input_error_is_not_resent(world: World, receiver, monkeypatch):
    monkeypatch.setattr(alerts_module, "RETRY_PENDING_AFTER", alerts_module.RETRY_PENDING_AFTER * 0)
    with dg.instance_for_test() as instance:  # its own run history: pending alerts of other tests stay out
        world = dataclasses.replace(world, instance=instance)
        result = refused_run(world, str(uuid.uuid4()), reason="ticket 9")
        instance.add_run_tags(result.run_id, {TAG_ALERT: "pending"})  # left by a sensor before the refusal tag

        context = dg.build_sensor_context(
            instance=instance,
            resources={"store": StoreResource(database_url=world.store_url), "alerts": alerts_to(receiver.hook_url)},
        )
        assert needs_attention_alert_sensor(context).skip_message == "nothing to alert"
        assert receiver.requests_to("hook") == []
        assert instance.get_run_by_id(result.run_id).tags[TAG_ALERT] == "input_error"


# -- failed runs of the other jobs: a batch, the board ---------------------------------------------------------
def test_a_batch_the_sweep_found_without_its_worker_pages_once_with_how_many_orders_it_held(world: World, receiver,
                                                                                            monkeypatch):
    monkeypatch.setattr(alerts_module, "RETRY_PENDING_AFTER", alerts_module.RETRY_PENDING_AFTER * 0)
    with dg.instance_for_test() as instance:
        orders = [str(uuid.uuid4()) for _ in range(3)]
        run = instance.create_run_for_job(fulfill_backlog, run_config=backlog_config(orders),
                                          tags={TAG_BATCH_SIZE: "3", "bitloot/trigger": "sensor"})
        instance.report_run_failed(run, message="run worker gone: it holds no live lease and 3 of its orders were "
                                   "never attempted; the sweep takes them up again")
        (failure,) = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        resources = {"alerts": alerts_to(receiver.hook_url), "store": StoreResource(database_url=world.store_url)}
        run_failure_alert_sensor(dg.build_run_status_sensor_context(
            sensor_name=run_failure_alert_sensor.name, dagster_instance=instance,
            dagster_run=instance.get_run_by_id(run.run_id), dagster_event=failure.dagster_event,
            resources=resources).for_run_failure())
        needs_attention_alert_sensor(dg.build_sensor_context(instance=instance, resources=resources))

        (text,) = receiver.texts  # once: the needs-attention sensor's tick does not send it again
        assert text.startswith("BitLoot batch run fulfill_backlog holding 3 order(s): run failed.")
        assert "Cause: run worker gone: it holds no live lease" in text
        assert "Next: the sweep takes its orders up again as their leases lapse." in text
        assert f"{DAGSTER_URL}/runs/{run.run_id}" in text
        assert instance.get_run_by_id(run.run_id).tags[TAG_ALERT] == "sent"


def test_a_batch_refused_for_a_typo_pages_nobody(world: World, receiver):
    result = world.batch(["not-a-uuid"])

    failure_alert(world.instance, world, result, receiver.hook_url)

    assert receiver.requests_to("hook") == []
    assert world.instance.get_run_by_id(result.run_id).tags[TAG_ALERT] == "input_error"


def test_a_failed_board_run_pages_with_its_cause(world: World, receiver, dead_url):
    nobody_listens = dead_url.split("/")[2]  # host:port
    dead_store = StoreResource(database_url=f"postgresql+psycopg://postgres@{nobody_listens}/store")
    result = dg.materialize([order_backlog], instance=world.instance, raise_on_error=False, resources={
        "store": dead_store, "policy": RecoveryPolicyResource(), "r2": world.r2, "alerts": alerts_to(None)})

    failure_alert(world.instance, world, result, receiver.hook_url)

    (text,) = receiver.texts
    assert text.startswith(f"BitLoot job {result.dagster_run.job_name}: run failed. Cause: order_backlog failed")
    assert "Next: its next scheduled run tries again" in text and f"{DAGSTER_URL}/runs/{result.run_id}" in text
