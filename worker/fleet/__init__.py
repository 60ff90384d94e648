"""The fleet: status and telemetry reports, their collectors and publisher, the fleet view, the supervisor."""
