// node-postgres named queries (prepared once per connection, reused)
// through pgfleet in transaction mode: several concurrent connections.
const { Client } = require('pg');
const dsn = process.argv[2];

async function worker(i) {
  const c = new Client({ connectionString: dsn });
  await c.connect();
  try {
    for (let j = 0; j < 50; j++) {
      const r = await c.query({ name: 'add', text: 'SELECT $1::int + $2::int AS s', values: [i, j] });
      if (r.rows[0].s !== i + j) throw new Error(`add: ${r.rows[0].s} != ${i + j}`);
      const u = await c.query({ name: 'upper', text: 'SELECT upper($1) AS u', values: ['w' + i] });
      if (u.rows[0].u !== 'W' + i) throw new Error('upper');
      await c.query('BEGIN');
      await c.query({ name: 'ins', text: 'INSERT INTO drv_node (worker, n) VALUES ($1, $2)', values: [i, j] });
      const n = await c.query({ name: 'cnt', text: 'SELECT count(*)::int AS n FROM drv_node WHERE worker = $1', values: [i] });
      await c.query('COMMIT');
      if (n.rows[0].n !== j + 1) throw new Error(`count ${n.rows[0].n} != ${j + 1}`);
      try {
        await c.query({ name: 'div', text: 'SELECT 1 / $1::int AS d', values: [0] });
        throw new Error('expected division by zero');
      } catch (e) {
        if (e.code !== '22012') throw e;
      }
    }
  } finally {
    await c.end();
  }
}

(async () => {
  const setup = new Client({ connectionString: dsn });
  await setup.connect();
  await setup.query('DROP TABLE IF EXISTS drv_node');
  await setup.query('CREATE TABLE drv_node (worker int, n int)');
  await setup.end();
  const results = await Promise.allSettled([0, 1, 2, 3, 4, 5].map(worker));
  const bad = results.map((r, i) => (r.status === 'rejected' ? `worker ${i}: ${r.reason}` : null)).filter(Boolean);
  if (bad.length) {
    console.log(bad.join('\n'));
    process.exit(1);
  }
  console.log('node-postgres ok');
})();
