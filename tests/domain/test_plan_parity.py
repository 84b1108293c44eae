"""The dry run and the runs walk one step table: on every demo scenario, `plan` for an order and then a run on it
end with the same outcome and the same reason; both as an admin retry (`plan ORDER_ID`, then a `fulfill_order`
run) and as the sweep would (the plan of a sweep run, then the order worked in a `fulfill_backlog` batch).

Outages are not decisions: the faults a scenario injects (a lost answer, R2 or Resend down for a while) are
cleared before planning, so plan and run see the same outside world.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bitloot_reconcile.adapters.kinguin import KinguinClient
from bitloot_reconcile.adapters.nowpayments import NowPaymentsClient
from bitloot_reconcile.commands import Readers, plan
from bitloot_reconcile.domain.planning import LEFT_ALONE, plan_order
from bitloot_reconcile.domain.switches import read_switches
from bitloot_reconcile.jobs import fulfill_backlog, fulfill_order
from bitloot_reconcile.resources.kinguin import KinguinResource
from bitloot_reconcile.resources.nowpayments import NowPaymentsResource
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_reconcile.resources.resend import ResendResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.settings import ReconcileVariables
from bitloot_reconcile.store.repository import Store, utcnow
from bitloot_standins.demo import SCENARIOS, DemoWorld, Scenario
from bitloot_standins.standins import BUCKET, KINGUIN_KEY, NOWPAYMENTS_KEY, RESEND_KEY, StandIns


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> Iterator[StandIns]:
    with StandIns(data_dir=tmp_path_factory.mktemp("standins")) as running:
        yield running


def clear_faults(standins: StandIns) -> None:
    for server in (standins.kinguin, standins.nowpayments, standins.resend):
        server.clear_faults()
    standins.r2_proxy.outages.clear()


def resources(standins: StandIns, store_url: str) -> dict:
    return {
        "store": StoreResource(database_url=store_url),
        "kinguin": KinguinResource(base_url=standins.kinguin.base_url, api_key=KINGUIN_KEY, timeout_seconds=3),
        "nowpayments": NowPaymentsResource(base_url=standins.nowpayments.url, api_key=NOWPAYMENTS_KEY,
                                           timeout_seconds=3),
        "r2": R2Resource(endpoint=standins.r2_proxy.url, access_key_id=standins.s3.access_key_id,
                         secret_access_key=standins.s3.secret_access_key, bucket=BUCKET),
        "mailer": ResendResource(base_url=standins.resend.url, api_key=RESEND_KEY, timeout_seconds=3),
        "policy": RecoveryPolicyResource(supplier_poll_attempts=2, supplier_poll_seconds=0.2),
    }


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_plan_and_run_end_alike(scenario: Scenario, standins: StandIns, store_engine, store_url, dagster_instance):
    order_id = scenario.seed(DemoWorld(store_engine, standins))
    clear_faults(standins)
    store = Store(store_engine)
    with (KinguinClient(standins.kinguin.base_url, KINGUIN_KEY) as kinguin,
          NowPaymentsClient(standins.nowpayments.url, NOWPAYMENTS_KEY) as nowpayments):
        (planned,) = plan(Readers(store, kinguin, nowpayments, standins.vault()), ReconcileVariables(),
                          order_ids=(order_id,))

    result = fulfill_order.execute_in_process(
        run_config={"order_id": order_id, "reason": "parity", "requested_by": "ops@bitloot.io"},
        resources=resources(standins, store_url), instance=dagster_instance, raise_on_error=False,
    )

    if planned.outcome == "left_alone":  # the run refuses the order as an input error
        failures = [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
        assert not result.success and planned.why in " ".join(failures)
        return
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    state = store.get_state(order_id)
    assert (planned.outcome, planned.why) == (state.last_outcome, state.last_reason), planned.steps


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_a_sweep_plan_and_the_batch_end_alike(scenario: Scenario, standins: StandIns, store_engine, store_url,
                                              dagster_instance):
    order_id = scenario.seed(DemoWorld(store_engine, standins))
    clear_faults(standins)
    store = Store(store_engine)
    order = store.load_order(order_id)
    with (KinguinClient(standins.kinguin.base_url, KINGUIN_KEY) as kinguin,
          NowPaymentsClient(standins.nowpayments.url, NOWPAYMENTS_KEY) as nowpayments):
        planned = plan_order(order, store.get_state(order_id), store.key_assignments(order_id), kinguin=kinguin,
                             payments=nowpayments, vault=standins.vault(), switches=read_switches(store),
                             bounce=store.email_suppression(order.email), now=utcnow(), admin=False)

    result = fulfill_backlog.execute_in_process(
        run_config={"ops": {"work_backlog": {"config": {"orders": [{"order_id": order_id, "reason": "parity"}]}}}},
        resources=resources(standins, store_url), instance=dagster_instance,
    )

    assert result.success
    if planned.outcome == LEFT_ALONE:  # the batch refuses the order as an input error: audited, nothing changed
        assert store.audit_trail(order_id)[-1]["detail"] == planned.why
        return
    state = store.get_state(order_id)
    assert (planned.outcome, planned.why) == (state.last_outcome, state.last_reason), planned.steps
