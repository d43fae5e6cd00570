// pgjdbc through the gateway, one scenario per run: java -cp .:postgresql.jar PgJdbc PORT TOKEN SCENARIO [URL-OPTIONS]
// Prints one "key=value" line per observation (values of a row joined by '|'), for tests/test_pg_drivers.py.
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Properties;
import org.postgresql.PGStatement;

public class PgJdbc {
    static int port;
    static String token;

    static Connection connect(String options) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", "agent-jdbc");
        props.setProperty("password", token); // the gateway asks for a cleartext password: the token
        props.setProperty("connectTimeout", "10");
        props.setProperty("socketTimeout", "30");
        return DriverManager.getConnection("jdbc:postgresql://127.0.0.1:" + port + "/app?" + options, props);
    }

    static void out(String key, Object value) {
        System.out.println(key + "=" + value);
    }

    static String row(ResultSet rs) throws SQLException {
        StringBuilder b = new StringBuilder();
        for (int i = 1; i <= rs.getMetaData().getColumnCount(); i++) {
            if (i > 1) b.append('|');
            b.append(rs.getString(i));
        }
        return b.toString();
    }

    static String error(SQLException e) {
        return e.getSQLState() + " " + e.getMessage().replace('\n', ' ');
    }

    static String first(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return row(rs);
        }
    }

    public static void main(String[] args) throws Exception {
        port = Integer.parseInt(args[0]);
        token = args[1];
        String scenario = args[2];
        String options = args.length > 3 ? args[3] : "sslmode=disable";
        try (Connection c = connect(options)) {
            switch (scenario) {
                case "prepared" -> prepared(c);
                case "binary" -> binary(c);
                case "simple" -> simple(c);
                case "transaction" -> transaction(c);
                case "fetch" -> fetch(c);
                case "metadata" -> metadata(c);
                case "batch" -> batch(c);
                case "autosave" -> autosave(c);
                case "evicted" -> evicted(c);
                default -> throw new IllegalArgumentException(scenario);
            }
        }
    }

    // Default settings: the extended protocol for everything; from the 5th execution (prepareThreshold) a named
    // server-side statement, with binary results for the types pgjdbc reads in binary (int4, int8, timestamptz).
    static void prepared(Connection c) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement(
                "SELECT id, email, card, cardnum, seen FROM jdbc_profiles WHERE id = ? ORDER BY id")) {
            for (int i = 1; i <= 7; i++) {
                ps.setInt(1, 1);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    out("row" + i, row(rs));
                }
                out("server_prepared" + i, ps.unwrap(PGStatement.class).isUseServerPrepare());
            }
        }
        try (Statement st = c.createStatement()) {
            st.executeUpdate("UPDATE accounts SET balance = 0 WHERE id = 1");
            out("update", "not denied");
        } catch (SQLException e) {
            out("update", error(e));
        }
        out("after", first(c, "SELECT count(*) FROM accounts"));
    }

    // Geometric types pgjdbc reads in binary from the 5th execution (point, box), in a masked result.
    static void binary(Connection c) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement("SELECT id, p, b FROM jdbc_profiles ORDER BY id")) {
            for (int i = 1; i <= 7; i++) {
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) out("row" + i + "_" + rs.getInt(1), rs.getObject(2) + "|" + rs.getObject(3));
                }
            }
            out("server_prepared", ps.unwrap(PGStatement.class).isUseServerPrepare());
        }
    }

    static void simple(Connection c) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement("SELECT id, email, card FROM customers WHERE id = ?")) {
            for (int i = 1; i <= 6; i++) {
                ps.setInt(1, 2);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    out("row" + i, row(rs));
                }
            }
        }
        try (PreparedStatement ps = c.prepareStatement("DELETE FROM customers WHERE id = ?")) {
            ps.setInt(1, 1);
            ps.executeUpdate();
            out("delete", "not denied");
        } catch (SQLException e) {
            out("delete", error(e));
        }
        out("after", first(c, "SELECT count(*), 'é' FROM customers"));
    }

    // A denial inside a transaction: the transaction is aborted, as at the server; rollback, and go on.
    static void transaction(Connection c) throws SQLException {
        c.setAutoCommit(false);
        // pgjdbc sends BEGIN ahead of the transaction's first statement, without a Sync between them
        out("literal", first(c, "SELECT 'é', 'a\\b', email FROM customers WHERE id = 1"));
        try (Statement st = c.createStatement()) {
            st.executeUpdate("UPDATE accounts SET balance = 0 WHERE id = 1");
            out("update", "not denied");
        } catch (SQLException e) {
            out("update", error(e));
        }
        try {
            first(c, "SELECT 1");
            out("aborted", "no");
        } catch (SQLException e) {
            out("aborted", e.getSQLState());
        }
        c.rollback();
        out("after", first(c, "SELECT count(*) FROM accounts WHERE balance = 100"));
        try (PreparedStatement ps = c.prepareStatement("SELECT email, ? FROM customers WHERE name = 'Customer 3'")) {
            ps.setString(1, "ü");
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                out("param", row(rs));
            }
        }
        c.commit();
    }

    // setFetchSize in a transaction: a portal run with a row limit, resumed by Execute until it completes.
    static void fetch(Connection c) throws SQLException {
        c.setAutoCommit(false);
        try (PreparedStatement ps = c.prepareStatement("SELECT id, email, card FROM customers ORDER BY id")) {
            ps.setFetchSize(3);
            int n = 0;
            try (ResultSet rs = ps.executeQuery()) {
                while (rs.next()) {
                    n++;
                    out("row" + rs.getInt(1), row(rs));
                }
            }
            out("rows", n);
        }
        c.commit();
    }

    static void metadata(Connection c) throws SQLException {
        DatabaseMetaData md = c.getMetaData();
        StringBuilder tables = new StringBuilder();
        try (ResultSet rs = md.getTables(null, "public", "%", new String[] {"TABLE"})) {
            while (rs.next()) tables.append(rs.getString("TABLE_NAME")).append(',');
        }
        out("tables", tables);
        StringBuilder columns = new StringBuilder();
        try (ResultSet rs = md.getColumns(null, "public", "customers", "%")) {
            while (rs.next()) columns.append(rs.getString("COLUMN_NAME")).append(':').append(rs.getString("TYPE_NAME")).append(',');
        }
        out("columns", columns);
        StringBuilder keys = new StringBuilder();
        try (ResultSet rs = md.getPrimaryKeys(null, "public", "customers")) {
            while (rs.next()) keys.append(rs.getString("COLUMN_NAME"));
        }
        out("keys", keys);
        out("version", md.getDatabaseMajorVersion());
    }

    // executeBatch: Bind/Execute per row, pipelined without a Sync between them.
    static void batch(Connection c) throws SQLException {
        c.setAutoCommit(false);
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO accounts (id, balance) VALUES (?, ?)")) {
            for (int i = 0; i < 200; i++) {
                ps.setInt(1, 7000 + i);
                ps.setInt(2, i);
                ps.addBatch();
            }
            out("batch", ps.executeBatch().length);
        }
        c.commit();
        out("email", first(c, "SELECT email FROM customers WHERE id = 1"));
        c.commit();
        try (Statement st = c.createStatement()) {
            st.addBatch("INSERT INTO accounts (id, balance) VALUES (7500, 1)");
            st.addBatch("DELETE FROM accounts");
            st.addBatch("INSERT INTO accounts (id, balance) VALUES (7501, 1)");
            st.executeBatch();
            out("denied_batch", "not denied");
        } catch (BatchUpdateException e) {
            out("denied_batch", error(e));
        }
        c.rollback();
        out("after", first(c, "SELECT count(*) FROM accounts WHERE id >= 7000"));
        c.commit();
    }

    // autosave=always: pgjdbc sends SAVEPOINT as a Query after BEGIN's Execute, before any Sync.
    static void autosave(Connection c) throws SQLException {
        c.setAutoCommit(false);
        try {
            out("select", first(c, "SELECT email FROM customers WHERE id = 1"));
        } catch (SQLException e) {
            out("select", error(e));
        }
        out("closed", c.isClosed());
    }

    // With preparedStatementCacheQueries=1 the second server-side statement evicts the first: pgjdbc sends its
    // Close ahead of the next query, without a Sync between them.
    static void evicted(Connection c) throws SQLException {
        for (String column : new String[] {"email", "card"}) {
            try (PreparedStatement ps = c.prepareStatement("SELECT " + column + " FROM customers WHERE id = ?")) {
                for (int i = 1; i <= 6; i++) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        out(column + i, rs.getString(1));
                    }
                }
            }
        }
        out("literal", first(c, "SELECT 'é'"));
    }
}
