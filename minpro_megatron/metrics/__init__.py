"""TensorBoard metrics (writer.py) and run reports: tables and plots read back from event files (report.py)."""
