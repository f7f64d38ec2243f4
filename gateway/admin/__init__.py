"""The operator's surface: admin routes, their token, the event feed; imports `cluster`, `api`."""
