import re
import time

from ulid import ULID

from meterproxy.ids import new_id, new_ulid


def test_an_id_is_a_prefixed_ulid_of_the_time_it_was_made():
    before = time.time()
    made = new_id("req")
    after = time.time()
    assert re.fullmatch(r"req_[0-9A-HJKMNP-TV-Z]{26}", made)
    parsed = ULID.from_str(made[4:])
    assert str(parsed) == made[4:]
    assert int(before * 1000) / 1000 <= parsed.timestamp <= after


def test_ids_sort_by_the_millisecond_they_were_made_and_differ_within_one():
    first = new_ulid()
    deadline = time.monotonic() + 5
    while (next_one := new_ulid())[:10] == first[:10] and time.monotonic() < deadline:
        pass  # until the next millisecond
    later = [next_one] + [new_ulid() for _ in range(1000)]
    assert all(first < ulid for ulid in later)
    assert len(set(later)) == len(later)
    assert {ulid[10:] for ulid in later} != {later[0][10:]}  # the random part is random
