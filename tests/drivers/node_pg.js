// node-postgres (`pg`) through the gateway: node node_pg.js PORT READONLY-TOKEN WRITER-TOKEN CA-FILE
// Prints one JSON object with what each step saw, for tests/test_pg_drivers.py.
const fs = require("fs");
const { Client } = require("pg");

const [port, readonly, writer, ca] = process.argv.slice(2);
const connect = async (token, ssl) => {
  const client = new Client({ host: "127.0.0.1", port: Number(port), database: "app", user: "agent-node", password: token, ssl });
  await client.connect();
  return client;
};
const failure = async (promise) => {
  try {
    await promise;
    return null;
  } catch (e) {
    return { code: e.code, message: e.message, detail: e.detail, hint: e.hint };
  }
};

(async () => {
  const out = {};
  // TLS without verifying the gateway's certificate (its CA is STATE/tls/postgres/ca.pem)
  const ro = await connect(readonly, { rejectUnauthorized: false });
  try {
    out.tls = ro.connection.stream.encrypted === true;
    out.simple = (await ro.query("SELECT id, email, card FROM customers ORDER BY id LIMIT 2")).rows;
    out.params = (await ro.query("SELECT id, email, $2::text AS word FROM customers WHERE id = $1", [3, "é"])).rows;
    const named = { name: "customer-by-id", text: "SELECT email, card FROM customers WHERE id = $1" };
    out.named = [];
    for (const id of [1, 4]) out.named.push((await ro.query({ ...named, values: [id] })).rows[0]);
    out.denied = await failure(ro.query("UPDATE accounts SET balance = 0 WHERE id = 1"));
    out.denied_named = await failure(ro.query({ name: "write", text: "DELETE FROM accounts WHERE id = $1", values: [1] }));
    await ro.query("BEGIN");
    out.denied_in_tx = await failure(ro.query("DELETE FROM accounts WHERE id = $1", [1]));
    out.aborted = await failure(ro.query("SELECT 1"));
    await ro.query("ROLLBACK");
    out.after = (await ro.query({ ...named, values: [2] })).rows[0];
  } finally {
    await ro.end();
  }
  // TLS verifying the gateway's certificate against its CA
  const verified = await connect(readonly, { ca: fs.readFileSync(ca, "utf8") });
  try {
    out.verified = (await verified.query("SELECT email FROM customers WHERE id = 1")).rows[0].email;
  } finally {
    await verified.end();
  }
  const wr = await connect(writer, false);
  try {
    out.inserted = [];
    const insert = { name: "insert-account", text: "INSERT INTO accounts (id, balance) VALUES ($1, $2) RETURNING id" };
    for (const id of [6000, 6001]) out.inserted.push((await wr.query({ ...insert, values: [id, 5] })).rows[0].id);
    out.deleted = (await wr.query("DELETE FROM accounts WHERE id BETWEEN $1 AND $2", [6000, 6001])).rowCount;
    out.writer_email = (await wr.query("SELECT email FROM customers WHERE id = 1")).rows[0].email;
    out.writer_denied = await failure(wr.query("DELETE FROM accounts"));
  } finally {
    await wr.end();
  }
  console.log(JSON.stringify(out));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
