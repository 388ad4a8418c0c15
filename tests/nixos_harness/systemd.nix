# systemd.services, systemd.timers, systemd.tmpfiles.rules, systemd.package
# and the unit files NixOS generates from them, declared with the structure of
# nixpkgs' nixos/lib/systemd-unit-options.nix (unit submodules, the
# `unitOption` merge: list definitions concatenated, equal scalars merged,
# different scalars a conflict; `serviceConfig` type-checked for Type= and
# Restart=) and rendered to text the way nixos/lib/systemd-lib.nix does
# (commonUnitText, serviceToUnit, timerToUnit, attrsToSection: one `Key=value`
# line per list element, booleans as true/false, `Environment=` lines
# JSON-quoted, X-RestartIfChanged/X-StopIfChanged markers). Written for this
# harness; only what a unit of module.nix can reach is here (no sockets,
# mounts, paths, slices; no makeUnit derivations: `systemd.units.<name>.text`
# is the unit file's content).
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkOption types;

  # --- systemd-lib.nix -------------------------------------------------------

  unitNameType = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";

  assertValueOneOf =
    name: values: group: attr:
    lib.optional (
      attr ? ${name} && !lib.elem attr.${name} values
    ) "Systemd ${group} field `${name}' cannot have value `${toString attr.${name}}'.";

  checkUnitConfig =
    group: checks: attrs:
    let
      # Applied at the attrsOf level: values may still be mkIf/mkOverride.
      defs = lib.mapAttrs (
        _: v: if lib.elem (v._type or "") [ "override" "if" ] then v.content else v
      ) attrs;
      errors = lib.concatMap (c: c group defs) checks;
    in
    if errors == [ ] then true else builtins.trace (lib.concatStringsSep "\n" errors) false;

  toOption =
    x:
    if x == true then
      "true"
    else if x == false then
      "false"
    else
      toString x;

  attrsToSection =
    as:
    lib.concatStrings (
      lib.concatLists (
        lib.mapAttrsToList (
          name: value: map (x: "${name}=${toOption x}\n") (if lib.isList value then value else [ value ])
        ) as
      )
    );

  makeJobScript = name: text: "${pkgs.writeText "unit-script-${name}" text}/bin/${name}";

  commonUnitText =
    def: lines:
    "[Unit]\n"
    + attrsToSection def.unitConfig
    + "\n"
    + lines
    + lib.optionalString (def.wantedBy != [ ]) (
      "\n[Install]\nWantedBy=${lib.concatStringsSep " " def.wantedBy}\n"
    );

  serviceToUnit = def: {
    inherit (def) wantedBy requiredBy enable;
    text = commonUnitText def (
      "[Service]\n"
      + (
        let
          env = config.systemd.globalEnvironment // def.environment;
        in
        lib.concatMapStrings (
          n: lib.optionalString (env.${n} != null) "Environment=${builtins.toJSON "${n}=${env.${n}}"}\n"
        ) (lib.attrNames env)
      )
      + (
        if def.reloadIfChanged then
          "X-ReloadIfChanged=true\n"
        else if !def.restartIfChanged then
          "X-RestartIfChanged=false\n"
        else
          ""
      )
      + lib.optionalString (!def.stopIfChanged) "X-StopIfChanged=false\n"
      + attrsToSection def.serviceConfig
    );
  };

  timerToUnit = def: {
    inherit (def) wantedBy requiredBy enable;
    text = commonUnitText def ("[Timer]\n" + attrsToSection def.timerConfig + "\n");
  };

  # --- systemd-unit-options.nix ----------------------------------------------

  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.any (def: lib.isList def.value) defs' then
        lib.concatMap (def: lib.toList def.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };

  checkService = checkUnitConfig "Service" [
    (assertValueOneOf "Type" [
      "exec"
      "simple"
      "forking"
      "oneshot"
      "dbus"
      "notify"
      "notify-reload"
      "idle"
    ])
    (assertValueOneOf "Restart" [
      "no"
      "on-success"
      "on-failure"
      "on-abnormal"
      "on-abort"
      "always"
    ])
  ];

  unitList =
    description:
    mkOption {
      default = [ ];
      type = types.listOf unitNameType;
      inherit description;
    };

  sharedOptions = {
    enable = mkOption {
      type = types.bool;
      default = true;
      description = "Whether the unit exists (false links it to /dev/null).";
    };
    wantedBy = unitList "Units that want this unit (.wants symlinks).";
    requiredBy = unitList "Units that require this unit (.requires symlinks).";
    upheldBy = unitList "Units that uphold this unit.";
    aliases = unitList "Aliases of the unit.";
  };

  commonUnitOptions =
    { config, options, ... }:
    {
      options = sharedOptions // {
        description = mkOption {
          type = types.singleLineStr;
          default = "";
          description = "Description= of the unit.";
        };
        documentation = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "Documentation= URIs.";
        };
        requires = unitList "Requires=";
        wants = unitList "Wants=";
        upholds = unitList "Upholds=";
        after = unitList "After=";
        before = unitList "Before=";
        bindsTo = unitList "BindsTo=";
        partOf = unitList "PartOf=";
        conflicts = unitList "Conflicts=";
        requisite = unitList "Requisite=";
        onFailure = unitList "OnFailure=";
        onSuccess = unitList "OnSuccess=";
        unitConfig = mkOption {
          type = types.attrsOf unitOption;
          default = { };
          description = "Settings of the [Unit] section.";
        };
        startLimitBurst = mkOption {
          type = types.int;
          description = "StartLimitBurst=";
        };
        startLimitIntervalSec = mkOption {
          type = types.int;
          description = "StartLimitIntervalSec=";
        };
      };
      # systemd-lib.nix `unitConfig`: the list options become [Unit] keys.
      config.unitConfig =
        lib.optionalAttrs (config.requires != [ ]) { Requires = toString config.requires; }
        // lib.optionalAttrs (config.wants != [ ]) { Wants = toString config.wants; }
        // lib.optionalAttrs (config.upholds != [ ]) { Upholds = toString config.upholds; }
        // lib.optionalAttrs (config.after != [ ]) { After = toString config.after; }
        // lib.optionalAttrs (config.before != [ ]) { Before = toString config.before; }
        // lib.optionalAttrs (config.bindsTo != [ ]) { BindsTo = toString config.bindsTo; }
        // lib.optionalAttrs (config.partOf != [ ]) { PartOf = toString config.partOf; }
        // lib.optionalAttrs (config.conflicts != [ ]) { Conflicts = toString config.conflicts; }
        // lib.optionalAttrs (config.requisite != [ ]) { Requisite = toString config.requisite; }
        // lib.optionalAttrs (config.description != "") { Description = config.description; }
        // lib.optionalAttrs (config.documentation != [ ]) {
          Documentation = toString config.documentation;
        }
        // lib.optionalAttrs (config.onFailure != [ ]) { OnFailure = toString config.onFailure; }
        // lib.optionalAttrs (config.onSuccess != [ ]) { OnSuccess = toString config.onSuccess; }
        // lib.optionalAttrs options.startLimitIntervalSec.isDefined {
          StartLimitIntervalSec = toString config.startLimitIntervalSec;
        }
        // lib.optionalAttrs options.startLimitBurst.isDefined {
          StartLimitBurst = toString config.startLimitBurst;
        };
    };

  stage2CommonUnitOptions = {
    imports = [ commonUnitOptions ];
    options = {
      restartTriggers = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
        description = "Items whose change restarts the unit.";
      };
      reloadTriggers = mkOption {
        type = types.listOf unitOption;
        default = [ ];
        description = "Items whose change reloads the unit.";
      };
    };
  };

  lines =
    description:
    mkOption {
      type = types.lines;
      default = "";
      inherit description;
    };

  serviceOptions =
    { name, config, ... }:
    {
      options = {
        environment = mkOption {
          type =
            with types;
            attrsOf (
              nullOr (oneOf [
                str
                path
                package
              ])
            );
          default = { };
          description = "Environment variables of the service's processes.";
        };
        path = mkOption {
          type =
            with types;
            listOf (oneOf [
              package
              str
            ]);
          default = [ ];
          description = "Packages whose bin and sbin go on the service's PATH.";
        };
        serviceConfig = mkOption {
          type = types.addCheck (types.attrsOf unitOption) checkService;
          default = { };
          description = "Settings of the [Service] section.";
        };
        script = lines "Main process, as a shell script.";
        scriptArgs = mkOption {
          type = types.str;
          default = "";
          description = "Arguments of the script.";
        };
        preStart = lines "ExecStartPre= script.";
        postStart = lines "ExecStartPost= script.";
        reload = lines "ExecReload= script.";
        preStop = lines "ExecStop= script.";
        postStop = lines "ExecStopPost= script.";
      };
      config = lib.mkMerge [
        (lib.mkIf (config.preStart != "") {
          serviceConfig.ExecStartPre = [ (makeJobScript "${name}-pre-start" config.preStart) ];
        })
        (lib.mkIf (config.script != "") {
          serviceConfig.ExecStart = makeJobScript "${name}-start" config.script + " " + config.scriptArgs;
        })
        (lib.mkIf (config.postStart != "") {
          serviceConfig.ExecStartPost = [ (makeJobScript "${name}-post-start" config.postStart) ];
        })
        (lib.mkIf (config.reload != "") {
          serviceConfig.ExecReload = makeJobScript "${name}-reload" config.reload;
        })
        (lib.mkIf (config.preStop != "") {
          serviceConfig.ExecStop = makeJobScript "${name}-pre-stop" config.preStop;
        })
        (lib.mkIf (config.postStop != "") {
          serviceConfig.ExecStopPost = makeJobScript "${name}-post-stop" config.postStop;
        })
      ];
    };

  stage2ServiceOptions = {
    imports = [
      stage2CommonUnitOptions
      serviceOptions
    ];
    options = {
      restartIfChanged = mkOption {
        type = types.bool;
        default = true;
        description = "Restart the service on a switch if its definition changed.";
      };
      reloadIfChanged = mkOption {
        type = types.bool;
        default = false;
        description = "Reload instead of restart.";
      };
      stopIfChanged = mkOption {
        type = types.bool;
        default = true;
        description = "Stop with the old, start with the new definition.";
      };
      startAt = mkOption {
        type = with types; either str (listOf str);
        default = [ ];
        description = "OnCalendar= of a generated timer.";
        apply = v: if lib.isList v then v else [ v ];
      };
    };
  };

  # systemd-lib.nix `serviceConfig` + `stage2ServiceConfig`: PATH from `path`,
  # and the minimal default path every NixOS service gets (mkAfter).
  stage2ServiceConfig =
    { config, ... }:
    {
      config.environment.PATH = lib.mkIf (config.path != [ ]) "${lib.makeBinPath config.path}:${lib.makeSearchPathOutput "bin" "sbin" config.path}";
      config.path = lib.mkAfter [
        pkgs.coreutils
        pkgs.findutils
        pkgs.gnugrep
        pkgs.gnused
        config'.systemd.package
      ];
    };
  config' = config;

  timerOptions = {
    imports = [ stage2CommonUnitOptions ];
    options.timerConfig = mkOption {
      type = types.attrsOf unitOption;
      default = { };
      description = "Settings of the [Timer] section.";
    };
  };

  cfg = config.systemd;
in
{
  options.systemd = {
    package = mkOption {
      type = types.package;
      default = pkgs.systemd;
      description = "The systemd package.";
    };
    globalEnvironment = mkOption {
      type =
        with types;
        attrsOf (
          nullOr (oneOf [
            str
            path
            package
          ])
        );
      default = { };
      description = "Environment of every service.";
    };
    services = mkOption {
      type = types.attrsOf (
        types.submodule [
          stage2ServiceOptions
          stage2ServiceConfig
        ]
      );
      default = { };
      description = "Definition of systemd service units.";
    };
    timers = mkOption {
      type = types.attrsOf (types.submodule [ timerOptions ]);
      default = { };
      description = "Definition of systemd timer units.";
    };
    tmpfiles.rules = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "tmpfiles.d(5) rules.";
    };
    units = mkOption {
      type = types.attrsOf types.unspecified;
      readOnly = true;
      internal = true;
      description = "The generated units: name -> { text; wantedBy; requiredBy; enable; }.";
    };
  };

  config.systemd.units =
    lib.mapAttrs' (n: v: lib.nameValuePair "${n}.service" (serviceToUnit v)) cfg.services
    // lib.mapAttrs' (n: v: lib.nameValuePair "${n}.timer" (timerToUnit v)) cfg.timers;
}
