// A stand-in app behind the proxies that routes like real apps do, to tell which route a
// path the bridge let through would reach.
//
// Run as `node tests/upstreams/route.js PORT` (binds 127.0.0.1). Every request is answered
// 200 with JSON: `received` (the request target exactly as the proxy sent it) and, for each
// of two ways apps read a path, the path read and the route it reaches (the path's first
// segment: "public", "admin", "internal", or "other"):
//   - "raw": the path as received, compared byte for byte (an app or router that neither
//     decodes nor resolves dot segments);
//   - "whatwg": `new URL(target, base).pathname` (WHATWG URL: `\` read as `/`, `%2e` as `.`,
//     dot segments resolved on the still-encoded path), then each segment percent-decoded:
//     what Node, Deno, Bun, Next.js middleware and Hono apps route on.
// A path whose segment cannot be decoded is answered 400 (the app would fail it too).
"use strict";

const http = require("node:http");

const ROUTES = new Set(["public", "admin", "internal"]);

function routeOf(segments) {
  // segments[0] is what precedes the leading "/": empty for an absolute path.
  if (segments.length < 2 || segments[0] !== "") return "other";
  return ROUTES.has(segments[1]) ? segments[1] : "other";
}

function readings(target) {
  const rawPath = target.split("?")[0];
  const raw = { path: rawPath, route: routeOf(rawPath.split("/")) };
  const pathname = new URL(target, "http://upstream.invalid").pathname;
  const segments = pathname.split("/").map(decodeURIComponent); // throws on a bad escape
  const whatwg = { path: segments.join("/"), route: routeOf(segments) };
  return { raw, whatwg };
}

function main() {
  const port = Number(process.argv[2]);
  if (!Number.isInteger(port) || port <= 0) {
    console.error("usage: node route.js PORT");
    process.exit(2);
  }
  const server = http.createServer((req, res) => {
    req.resume(); // a body, if any, is not this app's business
    let status = 200;
    let body;
    try {
      body = { upstream: "route.js", received: req.url, ...readings(req.url) };
    } catch (error) {
      status = 400;
      body = { upstream: "route.js", received: req.url, error: String(error) };
    }
    const text = JSON.stringify(body);
    res.writeHead(status, {
      "Content-Type": "application/json",
      "Content-Length": Buffer.byteLength(text),
    });
    res.end(req.method === "HEAD" ? undefined : text);
  });
  server.listen(port, "127.0.0.1");
}

main();
