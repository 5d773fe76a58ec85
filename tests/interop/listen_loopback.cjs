// Preloaded with `node -r ./listen_loopback.cjs`: the node-opcua sample server has no host
// option and would listen on every interface; tests must only ever listen on loopback.
"use strict";
const net = require("net");
const LOOPBACK = "127.0.0.1";
const originalListen = net.Server.prototype.listen;
net.Server.prototype.listen = function listenOnLoopback(...args) {
    const first = args[0];
    if (first !== null && typeof first === "object" && !Array.isArray(first)) {
        if (first.path === undefined) {
            args[0] = Object.assign({}, first, { host: LOOPBACK });
        }
    } else if (typeof first === "number" || (typeof first === "string" && /^\d+$/.test(first))) {
        if (typeof args[1] === "string") {
            args[1] = LOOPBACK;
        } else {
            args.splice(1, 0, LOOPBACK);
        }
    }
    return originalListen.apply(this, args);
};
