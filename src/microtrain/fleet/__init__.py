"""Federated fine-tuning of a simulated fleet of devices (`microtrain federate`).

`fleet.core` holds everything that decides a number (partitions, a device's local training, aggregation, payload
accounting, checkpoints), independent of the transport; `fleet.flower` runs it on Flower's simulation runtime
(ServerApp / ClientApp, started with `flwr run` on a local SuperLink).
"""
