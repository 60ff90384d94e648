"""The request path: intake, admission, the job, serve, sessions, replies, the control topic, takeover."""
