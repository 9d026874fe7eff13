-- Test only: server-to-server connections to the domains named in `s2s_loopback_routes` go to
-- 127.0.0.1 on the port given there, instead of where DNS (SRV, then A on port 5269) says.
--
--   plugin_paths = { "/folder/with/this/file" }
--   modules_enabled = { ...; "s2s_loopback" }
--   s2s_loopback_routes = { ["remote.localhost"] = 41234; ["localhost"] = 41235 }
--
-- mod_s2s asks net.resolvers.service for the targets of a new outgoing connection (the
-- `xmpp-server` service of the remote domain); this module wraps that constructor once per
-- process, so that a listed domain resolves to one loopback target and no DNS is asked.
-- Dialback needs both directions, so each server lists its own domain too.

module:set_global();

local basic = require "net.resolvers.basic";
local service = require "net.resolvers.service";

local routes = module:get_option("s2s_loopback_routes", {});

if not service.reach_test_original_new then
	service.reach_test_original_new = service.new;
end
local original_new = service.reach_test_original_new;

service.new = function (hostname, service_name, conn_type, extra)
	local port = routes[hostname];
	if port and service_name == "xmpp-server" then
		module:log("debug", "s2s to %s goes to 127.0.0.1:%d", hostname, port);
		return basic.new("127.0.0.1", port, conn_type, extra);
	end
	return original_new(hostname, service_name, conn_type, extra);
end

function module.unload()
	service.new = original_new;
end
