"""JSON Schemas of the MQTT payloads (see anomalyd/contract.py)."""
