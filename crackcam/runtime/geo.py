"""GPS logs matched to frame timestamps, and GeoJSON output for survey runs.

Accepted logs:

* CSV with columns ``time,lat,lon`` (header optional; extra columns ignored).  ``time`` is epoch seconds or an
  ISO 8601 date-time (``2024-05-01T10:00:00.5Z``; no zone = UTC).
* NMEA 0183 sentences ``$GPRMC``/``$GNRMC`` (date + time) and ``$GPGGA``/``$GNGGA`` (time of day; dated with the
  last RMC date seen, otherwise kept as seconds of the day).  Checksums are verified when present; void RMC fixes
  (status ``V``) and GGA fixes of quality 0 are dropped.  **Midnight**: a GGA time of day that falls more than
  12 h behind the previous fix is the next day (a GGA-only log keeps counting past 86,400 s; a dated GGA whose RMC
  of the new day has not come yet gets the next date).

Matching: ``track.locate(t)`` with ``method="linear"`` (interpolate between the two fixes around ``t``) or
``"nearest"``; no position when the nearest fix (or the gap between the two fixes) is farther than ``max_gap`` s.
A track with times of day only matches frames on ``t mod 86400`` (a track that runs past midnight also on the
next day's seconds).
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from .imageio import BadInputError


def _parse_time(s: str) -> float:
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        pass
    t = s.replace("Z", "+00:00")
    dt = datetime.fromisoformat(t)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def nmea_checksum(body: str) -> int:
    """The NMEA 0183 checksum of a sentence body (between ``$`` and ``*``): XOR of its characters."""
    x = 0
    for ch in body:
        x ^= ord(ch)
    return x


def _nmea_ok(line: str) -> bool:
    if "*" not in line:
        return True
    body, _, cs = line[1:].partition("*")
    try:
        return nmea_checksum(body) == int(cs[:2], 16)
    except ValueError:
        return False


def _nmea_deg(v: str, hemi: str) -> float:
    if not v:
        raise ValueError("empty coordinate")
    f = float(v)
    deg = int(f // 100)
    val = deg + (f - deg * 100) / 60.0
    return -val if hemi in ("S", "W") else val


def _nmea_tod(hhmmss: str) -> float:
    return int(hhmmss[0:2]) * 3600 + int(hhmmss[2:4]) * 60 + float(hhmmss[4:])


class GpsTrack:
    def __init__(self, times, lats, lons, time_of_day: bool = False, source: str = ""):
        order = sorted(range(len(times)), key=lambda i: times[i])
        self.t = [float(times[i]) for i in order]
        self.lat = [float(lats[i]) for i in order]
        self.lon = [float(lons[i]) for i in order]
        self.time_of_day = time_of_day
        self.source = source

    def __len__(self) -> int:
        return len(self.t)

    def locate(self, t: float | None, method: str = "linear", max_gap: float = 5.0) -> tuple[float, float] | None:
        """(lat, lon) at time ``t``, or None when out of range / too far from a fix."""
        if t is None or not self.t:
            return None
        if self.time_of_day:
            t = t % 86400.0
            if self.t and t < self.t[0] and self.t[-1] >= 86400.0:  # past midnight on a track that crosses it
                t += 86400.0
        if method not in ("linear", "nearest"):
            raise ValueError(f"unknown GPS matching method {method!r} (linear or nearest)")
        i = bisect.bisect_left(self.t, t)
        lo, hi = max(i - 1, 0), min(i, len(self.t) - 1)
        j = min((lo, hi), key=lambda k: abs(self.t[k] - t))  # the nearest fix
        t0, t1 = self.t[lo], self.t[hi]
        inside = t0 <= t <= t1 and t1 > t0
        if method == "linear" and inside and (t1 - t0) <= max_gap:
            a = (t - t0) / (t1 - t0)
            return self.lat[lo] + a * (self.lat[hi] - self.lat[lo]), self.lon[lo] + a * (self.lon[hi] - self.lon[lo])
        if abs(self.t[j] - t) <= max_gap:
            return self.lat[j], self.lon[j]
        return None


def read_gps(path) -> GpsTrack:
    """Read a CSV or NMEA log (format detected from the content); problems → BadInputError (one line)."""
    p = Path(path)
    try:
        text = p.read_text(errors="replace")
    except FileNotFoundError:
        raise BadInputError(p, "GPS log not found") from None
    except OSError as e:
        raise BadInputError(p, f"cannot read GPS log ({e.strerror})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise BadInputError(p, "GPS log is empty")
    if any(ln.startswith("$") for ln in lines[:50]):
        track = _read_nmea(lines, p)
    else:
        track = _read_csv(lines, p)
    if len(track) == 0:
        raise BadInputError(p, "GPS log holds no valid fix")
    return track


def _read_csv(lines, p) -> GpsTrack:
    rows = list(csv.reader(lines))
    head = [c.strip().lower() for c in rows[0]]
    ti, la, lo = 0, 1, 2
    if any(h in ("time", "timestamp", "t", "lat", "latitude") for h in head):
        def col(*names):
            for n in names:
                if n in head:
                    return head.index(n)
            raise BadInputError(p, f"CSV header {rows[0]} lacks one of {names}")
        ti, la, lo = col("time", "timestamp", "t"), col("lat", "latitude"), col("lon", "lng", "longitude")
        rows = rows[1:]
    ts, lats, lons = [], [], []
    for n, r in enumerate(rows, 2):
        try:
            t, a, b = _parse_time(r[ti]), float(r[la]), float(r[lo])
        except (ValueError, IndexError):
            continue  # a bad row is skipped; an all-bad file ends as "no valid fix"
        if math.isfinite(a) and math.isfinite(b) and -90 <= a <= 90 and -180 <= b <= 180:
            ts.append(t), lats.append(a), lons.append(b)
    return GpsTrack(ts, lats, lons, source=str(p))


def _read_nmea(lines, p) -> GpsTrack:
    ts, lats, lons = [], [], []
    date = None
    gga_tod = []  # GGA fixes before any date: (tod, lat, lon)
    have_date_fixes = False
    for ln in lines:
        if not ln.startswith("$") or not _nmea_ok(ln):
            continue
        f = ln.split("*")[0].split(",")
        typ = f[0][3:]
        try:
            if typ == "RMC" and len(f) >= 10:
                if f[2] != "A":
                    continue
                tod = _nmea_tod(f[1])
                d = f[9]
                day = datetime(2000 + int(d[4:6]), int(d[2:4]), int(d[0:2]), tzinfo=timezone.utc).timestamp()
                date = day
                ts.append(day + tod), lats.append(_nmea_deg(f[3], f[4])), lons.append(_nmea_deg(f[5], f[6]))
                have_date_fixes = True
            elif typ == "GGA" and len(f) >= 7:
                if f[6] in ("", "0"):
                    continue
                tod = _nmea_tod(f[1])
                lat, lon = _nmea_deg(f[2], f[3]), _nmea_deg(f[4], f[5])
                if date is not None:
                    t = date + tod
                    if ts and t < ts[-1] - 43200:  # after midnight, before the new day's RMC
                        t += 86400.0
                    if not ts or abs(ts[-1] - t) > 1e-6:  # RMC of the same epoch already holds it
                        ts.append(t), lats.append(lat), lons.append(lon)
                else:
                    if gga_tod and tod + 86400.0 * (gga_tod[-1][0] // 86400.0) < gga_tod[-1][0] - 43200:
                        tod += 86400.0 * (gga_tod[-1][0] // 86400.0 + 1)  # the log ran past midnight
                    elif gga_tod:
                        tod += 86400.0 * (gga_tod[-1][0] // 86400.0)
                    gga_tod.append((tod, lat, lon))
        except (ValueError, IndexError):
            continue
    if not have_date_fixes and gga_tod:
        return GpsTrack([g[0] for g in gga_tod], [g[1] for g in gga_tod], [g[2] for g in gga_tod],
                        time_of_day=True, source=str(p))
    return GpsTrack(ts, lats, lons, source=str(p))


def write_geojson(path, features: list[dict]) -> None:
    """FeatureCollection of points, written atomically."""
    from .sinks import atomic_write_bytes

    doc = {"type": "FeatureCollection", "features": features}
    atomic_write_bytes(Path(path), json.dumps(doc, indent=1).encode())


def point_feature(lat: float, lon: float, props: dict) -> dict:
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [lon, lat]}, "properties": props}
