"""The code location's sensors: the sweep that launches one run per stuck order, and the alerts
(runs, orders that need a person, the board's checks)."""

import dagster as dg

from bitloot_reconcile.sensors.alerts import build_needs_attention_alert_sensor, build_run_failure_alert_sensor
from bitloot_reconcile.sensors.board_alerts import build_board_check_alert_sensor
from bitloot_reconcile.sensors.sweep import build_stuck_orders_sensor


def build_sensors(*, sweep_interval_seconds: int, alert_interval_seconds: int) -> list[dg.SensorDefinition]:
    """Every sensor, with the daemon's floors between ticks given (the `RECONCILE_*_INTERVAL_SECONDS` settings)."""
    return [
        build_stuck_orders_sensor(sweep_interval_seconds),
        build_run_failure_alert_sensor(alert_interval_seconds),
        build_needs_attention_alert_sensor(alert_interval_seconds),
        build_board_check_alert_sensor(alert_interval_seconds),
    ]
