"""The code location loads: every job, sensor, asset and resource resolves without any environment set."""

from bitloot_reconcile.definitions import defs


def test_definitions_load():
    job = defs.resolve_job_def("fulfill_order")
    assert job.executor_def.name == "in_process"
    assert {"store", "kinguin", "nowpayments", "r2", "mailer", "policy"} <= set(defs.resources)


def test_launchpad_config_is_flat():
    job = defs.resolve_job_def("fulfill_order")
    fields = job.config_mapping.config_schema.config_type.fields
    assert set(fields) == {"order_id", "reason", "requested_by"}
