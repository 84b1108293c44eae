"""The code location's sensors: the sweep that launches one run per stuck order, and the alerts
(runs, orders that need a person, the board's checks)."""

from bitloot_reconcile.sensors.alerts import needs_attention_alert_sensor, run_failure_alert_sensor
from bitloot_reconcile.sensors.board_alerts import board_check_alert_sensor
from bitloot_reconcile.sensors.sweep import stuck_orders_sensor

SENSORS = [stuck_orders_sensor, run_failure_alert_sensor, needs_attention_alert_sensor, board_check_alert_sensor]

__all__ = ["SENSORS", "board_check_alert_sensor", "needs_attention_alert_sensor", "run_failure_alert_sensor",
           "stuck_orders_sensor"]
