"""asyncpg (prepares every query, keeps a statement cache) through pgfleet
in transaction mode: several concurrent connections, mixed workload."""
import asyncio
import sys

import asyncpg

DSN = sys.argv[1]


async def worker(i):
    conn = await asyncpg.connect(DSN)
    try:
        doubler = await conn.prepare("SELECT $1::int * 2")
        for j in range(50):
            assert await doubler.fetchval(j) == j * 2
            assert await conn.fetchval("SELECT $1::text || 'x'", f"w{i}") == f"w{i}x"
            async with conn.transaction():
                await conn.execute("INSERT INTO drv_asyncpg (worker, n) VALUES ($1, $2)", i, j)
                assert await conn.fetchval("SELECT count(*) FROM drv_asyncpg WHERE worker = $1", i) == j + 1
            try:
                await conn.fetchval("SELECT 1 / $1::int", 0)
            except asyncpg.DivisionByZeroError:
                pass
            else:
                raise AssertionError("expected division by zero")
        rows = await conn.fetch("SELECT g FROM generate_series(1, 500) g")
        assert [r["g"] for r in rows] == list(range(1, 501))
        await conn.executemany("INSERT INTO drv_asyncpg (worker, n) VALUES ($1, $2)", [(i, 1000 + k) for k in range(20)])
        assert await conn.fetchval("SELECT count(*) FROM drv_asyncpg WHERE worker = $1", i) == 70
    finally:
        await conn.close()


async def main():
    c = await asyncpg.connect(DSN)
    await c.execute("DROP TABLE IF EXISTS drv_asyncpg; CREATE TABLE drv_asyncpg (worker int, n int)")
    await c.close()
    results = await asyncio.gather(*(worker(i) for i in range(6)), return_exceptions=True)
    bad = [f"worker {i}: {r!r}" for i, r in enumerate(results) if isinstance(r, BaseException)]
    if bad:
        print("\n".join(bad))
        sys.exit(1)
    print("asyncpg ok")


asyncio.run(main())
