"""One host of tests/test_many_gateways.py's two-host case, run inside a network namespace of
its own (`ip netns exec`): a fake provider and a gateway on this namespace's loopback, the
ledger on PostgreSQL over the namespace's veth link. It sends its share of the concurrent
requests with the token given and prints a JSON report: each request's status and request id."""

import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai  # noqa: E402

from tests.harness import FakeProvider, Gateway  # noqa: E402


def main() -> None:
    ledger, token, requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fake = FakeProvider()
    gateway = Gateway(Path(tempfile.mkdtemp()), fake, db=ledger)
    try:
        fake.behave(*[{"first_byte_delay": 0.2}] * requests)

        def one_request(_: int) -> list:
            client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=token, max_retries=0, timeout=60)
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
                )
                return [200, raw.headers["x-lava-request-id"]]
            except openai.APIStatusError as refused:
                return [refused.status_code, refused.code]

        with ThreadPoolExecutor(max_workers=requests) as pool:
            outcomes = list(pool.map(one_request, range(requests)))
        for request_id in [outcome[1] for outcome in outcomes if outcome[0] == 200]:
            gateway.row(request_id)  # completed before the gateway stops
    finally:
        gateway.stop()
        fake.stop()
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main()
