"""Leader election between operator replicas on a coordination.k8s.io Lease, the Kubernetes
convention (client-go's leaderelection, controller-runtime's manager).

kopf's own peering pauses every operator of equal priority, so a default two-replica install
reconciled nothing. Here exactly one replica holds the Lease and runs kopf; the others wait.

- A candidate takes the Lease when it is free, released, or held by an identity whose record has
  not changed for `lease_seconds` as measured on the candidate's own monotonic clock (so clocks of
  different nodes never have to agree).
- The holder renews every `retry_seconds`. When it cannot renew for `renew_deadline_seconds`
  (shorter than the lease, so it stops before anyone else may start) it stops reconciling and
  becomes a candidate again, without exiting: an API-server outage of any length is ridden out,
  and whoever holds the Lease when the server returns carries on.
- On a clean shutdown the holder releases the Lease, so a standby takes over at its next retry.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import dataclass
from typing import Any

from .apply import Kind, Kube, KubeApiError

LEASE = Kind("coordination.k8s.io/v1", "Lease", "leases", True)
logger = logging.getLogger("modelship.leader")


def _micro_time(moment: datetime.datetime | None = None) -> str:
    """The Lease's MicroTime format (RFC 3339 with microseconds)."""
    moment = moment or datetime.datetime.now(tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaseSettings:
    namespace: str
    name: str
    identity: str
    lease_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_seconds: float = 2.0


class LeaderElector:
    """Acquire, hold and release one Lease; all Kubernetes calls run in a worker thread."""

    def __init__(self, kube: Kube, settings: LeaseSettings) -> None:
        if not settings.retry_seconds < settings.renew_deadline_seconds < settings.lease_seconds:
            raise ValueError("leader election needs retry < renew deadline < lease duration")
        self.kube = kube
        self.settings = settings
        self._observed: tuple[str, str] | None = None  # (resourceVersion, holder) last seen
        self._observed_at = 0.0
        self._lease: dict[str, Any] | None = None

    @property
    def is_leader(self) -> bool:
        spec = (self._lease or {}).get("spec") or {}
        return bool(spec.get("holderIdentity") == self.settings.identity)

    def _spec(self, transitions: int, acquired: bool) -> dict[str, Any]:
        now = _micro_time()
        spec: dict[str, Any] = {
            "holderIdentity": self.settings.identity,
            "leaseDurationSeconds": max(1, round(self.settings.lease_seconds)),
            "renewTime": now,
            "leaseTransitions": transitions,
        }
        if acquired:
            spec["acquireTime"] = now
        return spec

    def try_acquire_or_renew(self) -> bool:
        """One attempt (blocking): True when this replica holds the Lease afterwards."""
        s = self.settings
        current = self.kube.get(LEASE, s.namespace, s.name)
        if current is None:
            body = {
                "apiVersion": LEASE.api_version,
                "kind": LEASE.kind,
                "metadata": {"name": s.name, "namespace": s.namespace},
                "spec": self._spec(0, acquired=True),
            }
            try:
                self._lease = dict(self.kube.request("POST", LEASE.path(s.namespace), body=body))
            except KubeApiError as error:
                if error.status == 409:  # another replica created it first
                    return False
                raise
            return True
        spec = current.get("spec") or {}
        holder = str(spec.get("holderIdentity") or "")
        record = (str(current["metadata"].get("resourceVersion")), holder)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        duration = float(spec.get("leaseDurationSeconds") or s.lease_seconds)
        expired = time.monotonic() - self._observed_at > duration
        if holder and holder != s.identity and not expired:
            self._lease = current
            return False
        ours = holder == s.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        new_spec = self._spec(transitions, acquired=not ours)
        if ours and spec.get("acquireTime"):
            new_spec["acquireTime"] = spec["acquireTime"]
        body = {**current, "spec": new_spec}
        try:
            # resourceVersion in the body: a replica that raced us gets 409 and stays standby.
            self._lease = dict(self.kube.request("PUT", LEASE.path(s.namespace, s.name), body=body))
        except KubeApiError as error:
            if error.status == 409:
                return False
            raise
        self._observed = (str(self._lease["metadata"].get("resourceVersion")), s.identity)
        self._observed_at = time.monotonic()
        return True

    async def acquire(self) -> None:
        """Wait until this replica holds the Lease."""
        announced = False
        while True:
            try:
                if await asyncio.to_thread(self.try_acquire_or_renew):
                    logger.info(
                        "became the leader (Lease %s/%s)",
                        self.settings.namespace,
                        self.settings.name,
                    )
                    return
                if not announced:
                    holder = ((self._lease or {}).get("spec") or {}).get("holderIdentity")
                    logger.info("standing by: %s holds the Lease", holder)
                    announced = True
            except KubeApiError as error:
                logger.warning("cannot reach the Lease yet: %s", error)
            await asyncio.sleep(self.settings.retry_seconds)

    async def hold(self) -> None:
        """Renew until leadership is lost (someone else holds the Lease, or renewing failed for
        longer than the renew deadline); then return."""
        last_renewed = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.retry_seconds)
            try:
                if await asyncio.to_thread(self.try_acquire_or_renew):
                    last_renewed = time.monotonic()
                    continue
                logger.warning(
                    "lost the Lease to %s",
                    ((self._lease or {}).get("spec") or {}).get("holderIdentity"),
                )
                return
            except KubeApiError as error:
                logger.warning("could not renew the Lease: %s", error)
            if time.monotonic() - last_renewed > self.settings.renew_deadline_seconds:
                logger.warning(
                    "no renewal for %.0fs: stepping down until the API server answers again",
                    self.settings.renew_deadline_seconds,
                )
                return

    def release(self) -> None:
        """Give the Lease up (clean shutdown), so a standby takes over at its next retry."""
        if not self.is_leader or self._lease is None:
            return
        spec = dict(self._lease.get("spec") or {})
        spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=_micro_time())
        body = {**self._lease, "spec": spec}
        try:
            s = self.settings
            self.kube.request("PUT", LEASE.path(s.namespace, s.name), body=body)
            logger.info("released the Lease")
        except KubeApiError as error:
            logger.warning("could not release the Lease (it expires by itself): %s", error)
        self._lease = None
