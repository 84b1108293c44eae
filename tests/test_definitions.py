"""The code location loads: every job, sensor, schedule, asset and resource resolves without any environment set,
and a malformed setting stops the load with the variable's name."""

import os
import subprocess
import sys

import dagster as dg

from bitloot_reconcile import definitions
from bitloot_reconcile.settings import ReconcileVariables, Settings

defs = definitions.defs()  # as Dagster loads the code location: from the environment now

SECRETS = {  # resource -> its fields that are credentials, and the variable each must be read from at run time
    "store": {"database_url": "DATABASE_URL"},
    "kinguin": {"api_key": "KINGUIN_API_KEY"},
    "nowpayments": {"api_key": "NOWPAYMENTS_API_KEY"},
    "r2": {"access_key_id": "R2_ACCESS_KEY_ID", "secret_access_key": "R2_SECRET_ACCESS_KEY"},
    "mailer": {"api_key": "RESEND_API_KEY"},
}


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)
    repository = defs.get_repository_def()
    # Dagster adds "__ASSET_JOB", its implicit job over every asset.
    assert {job.name for job in repository.get_all_jobs() if not job.name.startswith("__")} == {
        "fulfill_order", "fulfill_backlog", "reconciliation_report_job", "order_backlog_job", "prune_order_history"}
    assert {sensor.name for sensor in repository.sensor_defs} == {
        "stuck_orders_sensor", "run_failure_alert_sensor", "needs_attention_alert_sensor", "board_check_alert_sensor"}
    assert {schedule.name for schedule in repository.schedule_defs} == {
        "reconciliation_report_schedule", "order_backlog_schedule", "prune_order_history_schedule"}
    assert {key.to_user_string() for key in repository.asset_graph.get_all_asset_keys()} == {
        "reconciliation_report", "order_backlog", "order_attempts"}
    assert repository.asset_graph.get(dg.AssetKey("order_attempts")).partitions_def == dg.DynamicPartitionsDefinition(
        name="order_ids")
    sweep = repository.get_sensor_def("stuck_orders_sensor")
    assert {target.job_name for target in sweep.targets} == {"fulfill_order", "fulfill_backlog"}
    assert set(defs.resources) == {"store", "kinguin", "nowpayments", "r2", "mailer", "policy", "alerts"}
    assert defs.resolve_job_def("fulfill_order").executor_def.name == "in_process"
    assert defs.resolve_job_def("fulfill_backlog").executor_def.name == "in_process"


def test_secrets_reach_the_resources_only_as_env_vars():
    for resource, fields in SECRETS.items():
        for field, variable in fields.items():
            value = getattr(defs.resources[resource], field)
            assert isinstance(value, dg.EnvVar) and value.env_var_name == variable, (resource, field)


def test_launchpad_config_is_flat():
    job = defs.resolve_job_def("fulfill_order")
    fields = job.config_mapping.config_schema.config_type.fields
    assert set(fields) == {"order_id", "reason", "requested_by", "max_unit_price_eur",
                           "replace_canceled_supplier_order", "resolution"}
    assert {name for name, field in fields.items() if field.is_required} == {"order_id", "reason", "requested_by"}


def test_a_malformed_setting_stops_the_load_naming_the_variable():
    env = {**os.environ, "RECONCILE_GRACE_MINUTES": "abc"}
    loaded = subprocess.run([sys.executable, "-c", "from bitloot_reconcile.definitions import defs; defs()"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode != 0
    assert "RECONCILE_GRACE_MINUTES: Input should be a valid number" in loaded.stderr


def test_the_settings_given_set_the_sensors_intervals():
    tunables = ReconcileVariables(sweep_interval_seconds=7, alert_interval_seconds=11, board_sla_minutes=25)
    built = definitions.build_definitions(Settings(reconcile=tunables)).get_repository_def()
    assert built.get_sensor_def("stuck_orders_sensor").minimum_interval_seconds == 7
    assert built.get_sensor_def("needs_attention_alert_sensor").minimum_interval_seconds == 11
    assert built.get_sensor_def("board_check_alert_sensor").minimum_interval_seconds == 11
    assert built.get_sensor_def("run_failure_alert_sensor").minimum_interval_seconds == 11
